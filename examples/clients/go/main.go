// Command digitsclient sends one sample of the digits example to Ferry over gRPC and prints
// the predicted label and the class probabilities.
//
// Start Ferry first (scripts/serve-example.sh), then, from this folder:
//
//	go run . -addr 127.0.0.1:8001 -sample 0
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
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

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
	samplesPath := flag.String("samples", "../../digits_samples.json", "samples file")
	index := flag.Int("sample", 0, "which sample of the file to send")
	timeout := flag.Duration("timeout", 10*time.Second, "deadline of the request")
	flag.Parse()
	log.SetFlags(0)
	log.SetPrefix("digitsclient: ")

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
		log.Fatalf("ModelInfer: %v", err)
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
