"""Ferry's wire contract: the Open Inference Protocol stubs and the tensor wire codec."""
