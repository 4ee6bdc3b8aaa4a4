#!/usr/bin/env node
// Send one sample of the digits example to Ferry over gRPC and print the predicted label and
// the class probabilities. Start Ferry first (scripts/serve-example.sh), then (README.md):
//
//   npm ci --prefix examples/clients/node
//   node examples/clients/node/digits_client.js --addr 127.0.0.1:8001 --sample 0
//
// The service definition is loaded at run time from Ferry's proto/ folder.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const REPO = path.resolve(__dirname, '..', '..', '..');

function parseOptions() {
  const { values } = parseArgs({
    options: {
      addr: { type: 'string', default: '127.0.0.1:8001' },
      model: { type: 'string', default: 'digits' },
      samples: { type: 'string', default: path.join(REPO, 'examples', 'digits_samples.json') },
      sample: { type: 'string', default: '0' },
      proto: { type: 'string', default: path.join(REPO, 'proto') },
      'timeout-ms': { type: 'string', default: '10000' },
    },
  });
  return { ...values, sample: Number(values.sample), timeoutMs: Number(values['timeout-ms']) };
}

function loadSample(file, index) {
  const { pixels } = JSON.parse(fs.readFileSync(file, 'utf8'));
  if (!Number.isInteger(index) || index < 0 || index >= pixels.length) {
    throw new Error(`${file}: sample ${index} out of range, it has ${pixels.length}`);
  }
  return pixels[index];
}

function loadService(protoDir) {
  const definition = protoLoader.loadSync('grpc_service.proto', {
    includeDirs: [protoDir],
    keepCase: true, // field names exactly as in the .proto: model_name, raw_input_contents
    longs: String, // int64 fields (shapes) arrive as strings: no silent loss of precision
    defaults: true,
  });
  return grpc.loadPackageDefinition(definition).inference.GRPCInferenceService;
}

// Raw tensor contents are little-endian with no padding (Open Inference Protocol).
function encodeFloat32(values) {
  const raw = Buffer.alloc(4 * values.length);
  values.forEach((value, i) => raw.writeFloatLE(value, 4 * i));
  return raw;
}

// The shortest decimal that reads back as the same float32, as Go's json does for []float32:
// a float32 widened to a JavaScript number would print with noise digits (0.10000000149...).
// Nine significant digits always suffice for a float32.
function float32Text(value) {
  for (let digits = 1; digits <= 9; digits += 1) {
    const text = value.toPrecision(digits);
    if (Math.fround(Number(text)) === value) {
      return String(Number(text));
    }
  }
  return String(value);
}

// gRPC status codes by their canonical names (NOT_FOUND, UNAVAILABLE, ...), as Ferry's README
// and the Go client print them. grpc.status is a TypeScript enum: it maps numbers to names too.
function statusName(code) {
  const name = grpc.status[code];
  return typeof name === 'string' ? name : `status ${code}`;
}

function decodeOutputs(response) {
  const raws = response.raw_output_contents;
  if (raws.length !== response.outputs.length) {
    throw new Error(`response has ${response.outputs.length} outputs but ${raws.length} raw contents`);
  }
  const result = {};
  response.outputs.forEach((output, i) => {
    const raw = raws[i];
    if (output.name === 'label') {
      if (output.datatype !== 'INT64' || raw.length !== 8) {
        throw new Error(`label: expected one INT64, got ${output.datatype} in ${raw.length} bytes`);
      }
      result.label = raw.readBigInt64LE(0);
    } else if (output.name === 'probabilities') {
      if (output.datatype !== 'FP32' || raw.length % 4 !== 0) {
        throw new Error(`probabilities: expected FP32, got ${output.datatype} in ${raw.length} bytes`);
      }
      result.probabilities = Array.from({ length: raw.length / 4 }, (_, j) => raw.readFloatLE(4 * j));
    }
  });
  if (result.label === undefined || result.probabilities === undefined) {
    throw new Error('response lacks label or probabilities');
  }
  return result;
}

function main() {
  const options = parseOptions();
  const pixels = loadSample(options.samples, options.sample);
  const Service = loadService(options.proto);
  const client = new Service(options.addr, grpc.credentials.createInsecure());

  const request = {
    model_name: options.model,
    inputs: [{ name: 'pixels', datatype: 'FP32', shape: [1, pixels.length] }],
    outputs: [{ name: 'label' }, { name: 'probabilities' }],
    raw_input_contents: [encodeFloat32(pixels)],
  };
  const deadline = new Date(Date.now() + options.timeoutMs);
  client.ModelInfer(request, { deadline }, (error, response) => {
    client.close();
    if (error) {
      console.error(`digits_client: ModelInfer: ${statusName(error.code)}: ${error.details}`);
      process.exitCode = 1;
      return;
    }
    try {
      const { label, probabilities } = decodeOutputs(response);
      console.log(`label: ${label}`);
      console.log(`probabilities: [${probabilities.map(float32Text).join(',')}]`);
    } catch (decodeError) {
      console.error(`digits_client: ${decodeError.message}`);
      process.exitCode = 1;
    }
  });
}

try {
  main();
} catch (error) {
  console.error(`digits_client: ${error.message}`);
  process.exitCode = 1;
}
