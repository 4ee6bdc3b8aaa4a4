"""Ferry's own protobuf descriptor pool.

The generated stubs register here rather than in protobuf's default pool, so that Ferry
and another copy of the same protocol (tritonclient's stubs, say) load in one process.
Server reflection serves its descriptors from this pool.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
