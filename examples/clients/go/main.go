// Command digitsclient sends one sample of the digits example to Ferry over gRPC and prints
// the predicted label and the class probabilities.
//
// Start Ferry first (scripts/serve-example.sh), then, from the repository root (README.md):
//
//	go -C examples/clients/go run . -addr 127.0.0.1:8001 -sample 0
//
// The stubs in inference/ are generated from Ferry's proto/ by generate.sh.
package main

//go:generate ./generate.sh

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"math"
	"os"
	"path/filepath"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	pb "ferry.example/digitsclient/inference"
)

// samples is the layout of examples/digits_samples.json.
type samples struct {
	Pixels [][]float32 `json:"pixels"`
	Labels []int64     `json:"labels"`
}

func main() {
	addr := flag.String("addr", "127.0.0.1:8001", "Ferry's gRPC address, host:port")
	model := flag.String("model", "digits", "model name")
	samplesPath := flag.String("samples", "",
		"samples file (default: examples/digits_samples.json, found from the repository root or this folder)")
	index := flag.Int("sample", 0, "which sample of the file to send")
	timeout := flag.Duration("timeout", 10*time.Second, "deadline of the request")
	flag.Parse()
	log.SetFlags(0)
	log.SetPrefix("digitsclient: ")
	var err error

	if *samplesPath == "" {
		*samplesPath, err = defaultSamples()
		if err != nil {
			log.Fatal(err)
		}
	}
	pixels, err := loadSample(*samplesPath, *index)
	if err != nil {
		log.Fatal(err)
	}

	conn, err := grpc.NewClient(*addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatalf("connect to %s: %v", *addr, err)
	}
	defer conn.Close()
	client := pb.NewGRPCInferenceServiceClient(conn)

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	response, err := client.ModelInfer(ctx, &pb.ModelInferRequest{
		ModelName: *model,
		Inputs: []*pb.ModelInferRequest_InferInputTensor{{
			Name:     "pixels",
			Datatype: "FP32",
			Shape:    []int64{1, int64(len(pixels))},
		}},
		Outputs: []*pb.ModelInferRequest_InferRequestedOutputTensor{
			{Name: "label"}, {Name: "probabilities"},
		},
		RawInputContents: [][]byte{encodeFloat32s(pixels)},
	})
	if err != nil {
		log.Fatalf("ModelInfer: %s: %s", statusName(status.Code(err)), status.Convert(err).Message())
	}

	label, probabilities, err := decodeOutputs(response)
	if err != nil {
		log.Fatal(err)
	}
	probabilitiesJSON, err := json.Marshal(probabilities)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("label: %d\n", label)
	fmt.Printf("probabilities: %s\n", probabilitiesJSON)
}

// samplesCandidates are where examples/digits_samples.json is, seen from the repository root
// and from this folder: the two places the README runs the client from.
var samplesCandidates = []string{
	filepath.Join("examples", "digits_samples.json"),
	filepath.Join("..", "..", "digits_samples.json"),
}

func defaultSamples() (string, error) {
	for _, candidate := range samplesCandidates {
		if _, err := os.Stat(candidate); err == nil {
			return candidate, nil
		}
	}
	return "", fmt.Errorf("no samples file at %s (run from the repository root or "+
		"examples/clients/go, or pass -samples PATH)", strings.Join(samplesCandidates, " or "))
}

// statusNames are gRPC's canonical code names, as Ferry's README and the Node.js client print
// them (codes.Code's own String gives Go-style names such as NotFound).
var statusNames = map[codes.Code]string{
	codes.OK: "OK", codes.Canceled: "CANCELLED", codes.Unknown: "UNKNOWN",
	codes.InvalidArgument: "INVALID_ARGUMENT", codes.DeadlineExceeded: "DEADLINE_EXCEEDED",
	codes.NotFound: "NOT_FOUND", codes.AlreadyExists: "ALREADY_EXISTS",
	codes.PermissionDenied: "PERMISSION_DENIED", codes.ResourceExhausted: "RESOURCE_EXHAUSTED",
	codes.FailedPrecondition: "FAILED_PRECONDITION", codes.Aborted: "ABORTED",
	codes.OutOfRange: "OUT_OF_RANGE", codes.Unimplemented: "UNIMPLEMENTED",
	codes.Internal: "INTERNAL", codes.Unavailable: "UNAVAILABLE", codes.DataLoss: "DATA_LOSS",
	codes.Unauthenticated: "UNAUTHENTICATED",
}

func statusName(code codes.Code) string {
	if name, ok := statusNames[code]; ok {
		return name
	}
	return fmt.Sprintf("status %d", uint32(code))
}

func loadSample(path string, index int) ([]float32, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var file samples
	if err := json.Unmarshal(data, &file); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if index < 0 || index >= len(file.Pixels) {
		return nil, fmt.Errorf("%s: sample %d out of range, it has %d", path, index, len(file.Pixels))
	}
	return file.Pixels[index], nil
}

// encodeFloat32s lays out values as the protocol's raw tensor contents: little-endian, no padding.
func encodeFloat32s(values []float32) []byte {
	raw := make([]byte, 4*len(values))
	for i, v := range values {
		binary.LittleEndian.PutUint32(raw[4*i:], math.Float32bits(v))
	}
	return raw
}

// decodeOutputs reads the one row of "label" (INT64) and "probabilities" (FP32) from the
// response's raw contents, which come in the order of its outputs.
func decodeOutputs(response *pb.ModelInferResponse) (int64, []float32, error) {
	raws := response.GetRawOutputContents()
	if len(raws) != len(response.GetOutputs()) {
		return 0, nil, fmt.Errorf("response has %d outputs but %d raw contents",
			len(response.GetOutputs()), len(raws))
	}
	var label int64
	var probabilities []float32
	found := 0
	for i, output := range response.GetOutputs() {
		raw := raws[i]
		switch output.GetName() {
		case "label":
			if output.GetDatatype() != "INT64" || len(raw) != 8 {
				return 0, nil, fmt.Errorf("label: expected one INT64, got %s in %d bytes",
					output.GetDatatype(), len(raw))
			}
			label = int64(binary.LittleEndian.Uint64(raw))
			found++
		case "probabilities":
			if output.GetDatatype() != "FP32" || len(raw)%4 != 0 {
				return 0, nil, fmt.Errorf("probabilities: expected FP32, got %s in %d bytes",
					output.GetDatatype(), len(raw))
			}
			probabilities = make([]float32, len(raw)/4)
			for j := range probabilities {
				probabilities[j] = math.Float32frombits(binary.LittleEndian.Uint32(raw[4*j:]))
			}
			found++
		}
	}
	if found != 2 {
		return 0, nil, fmt.Errorf("response lacks label or probabilities")
	}
	return label, probabilities, nil
}
