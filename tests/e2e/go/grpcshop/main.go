// Command grpcshop is the Go gRPC service of zerotrace's grpc-go tests: grpc-go's interop
// TestService (built from the offline module sources, see tools::go_build_with) whose
// handlers answer by what the request asks (a status code, a delay), call an HTTP route of
// the same process from inside the handler, and stream; the Rust test services' Echo
// service (zerotrace.test.v1.Echo/Unary, its messages read and written with protowire:
// no generated code); plus a client mode that makes the calls a test checks.
//
// Usage: grpcshop serve GRPC_ADDR HTTP_ADDR | grpcshop call GRPC_ADDR CONCURRENT [START] |
// grpcshop echo GRPC_ADDR N [START] | grpcshop load GRPC_ADDR SECONDS CONCURRENT. A client
// mode given START waits until that file exists before it calls (so a test can attach to
// it first). load is the benchmark's load generator: no-op Echo/Unary calls from
// CONCURRENT goroutines on one connection, as many as they can make in SECONDS; it prints
// "completed N errors E p50_ms X p99_ms Y".
package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"strconv"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	testpb "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/types/known/emptypb"
)

var downstream string

type server struct {
	testpb.UnimplementedTestServiceServer
}

// UnaryCall: response_status asks for a code; response_size > 0 asks for a delay in ms
// (ended early by the deadline); every OK call first GETs /leaf/ of this process's HTTP
// server (a client span under the RPC's span).
func (server) UnaryCall(ctx context.Context, in *testpb.SimpleRequest) (*testpb.SimpleResponse, error) {
	if s := in.GetResponseStatus(); s != nil && s.GetCode() != 0 {
		return nil, status.Error(codes.Code(s.GetCode()), s.GetMessage())
	}
	if d := in.GetResponseSize(); d > 0 {
		select {
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		case <-time.After(time.Duration(d) * time.Millisecond):
		}
	}
	resp, err := http.Get(downstream + "/leaf/" + strconv.Itoa(int(in.GetResponseType())))
	if err != nil {
		return nil, status.Error(codes.Unavailable, err.Error())
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return &testpb.SimpleResponse{}, nil
}

// StreamingOutputCall: one message per requested size.
func (server) StreamingOutputCall(in *testpb.StreamingOutputCallRequest, out testpb.TestService_StreamingOutputCallServer) error {
	for range in.GetResponseParameters() {
		if err := out.Send(&testpb.StreamingOutputCallResponse{}); err != nil {
			return err
		}
	}
	return nil
}

// echoUnary answers zerotrace.test.v1.Echo/Unary (EchoRequest{text = 1; code = 2}): fails
// with status `code` when it is not 0, else replies EchoReply{text = 1} with the text. The
// request arrives as an Empty whose unknown fields are the EchoRequest's.
func echoUnary(_ any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
	in := new(emptypb.Empty)
	if err := dec(in); err != nil {
		return nil, err
	}
	var text string
	var code int32
	b := in.ProtoReflect().GetUnknown()
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, status.Error(codes.InvalidArgument, "bad request")
		}
		b = b[n:]
		switch {
		case num == 1 && typ == protowire.BytesType:
			v, m := protowire.ConsumeString(b)
			text, n = v, m
		case num == 2 && typ == protowire.VarintType:
			v, m := protowire.ConsumeVarint(b)
			code, n = int32(v), m
		default:
			n = protowire.ConsumeFieldValue(num, typ, b)
		}
		if n < 0 {
			return nil, status.Error(codes.InvalidArgument, "bad request")
		}
		b = b[n:]
	}
	if code != 0 {
		return nil, status.Error(codes.Code(code), "asked for")
	}
	out := new(emptypb.Empty)
	out.ProtoReflect().SetUnknown(protowire.AppendString(protowire.AppendTag(nil, 1, protowire.BytesType), text))
	return out, nil
}

var echoDesc = grpc.ServiceDesc{
	ServiceName: "zerotrace.test.v1.Echo",
	HandlerType: (*any)(nil),
	Methods:     []grpc.MethodDesc{{MethodName: "Unary", Handler: echoUnary}},
}

func serve(grpcAddr, httpAddr string) {
	downstream = "http://" + httpAddr
	mux := http.NewServeMux()
	mux.HandleFunc("/leaf/", func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "leaf") })
	go func() {
		if err := http.ListenAndServe(httpAddr, mux); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}()
	lis, err := net.Listen("tcp", grpcAddr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	s := grpc.NewServer()
	testpb.RegisterTestServiceServer(s, server{})
	s.RegisterService(&echoDesc, struct{}{})
	fmt.Println("listening on", grpcAddr)
	if err := s.Serve(lis); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

// call makes, on one connection: an OK call, a NOT_FOUND, a call past its deadline, a
// server stream of 3, a method the service does not implement, a service the server does
// not have, then N concurrent OK calls whose
// response_type (the id their downstream call repeats) is 100+i. Prints each outcome.
func call(addr string, n int) error {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	c := testpb.NewTestServiceClient(conn)
	ctx := context.Background()
	_, err = c.UnaryCall(ctx, &testpb.SimpleRequest{ResponseType: 1})
	fmt.Println("ok", status.Code(err))
	_, err = c.UnaryCall(ctx, &testpb.SimpleRequest{ResponseStatus: &testpb.EchoStatus{Code: int32(codes.NotFound), Message: "no such item"}})
	fmt.Println("notfound", status.Code(err))
	short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	_, err = c.UnaryCall(short, &testpb.SimpleRequest{ResponseSize: 2000})
	cancel()
	fmt.Println("deadline", status.Code(err))
	stream, err := c.StreamingOutputCall(ctx, &testpb.StreamingOutputCallRequest{ResponseParameters: make([]*testpb.ResponseParameters, 3)})
	if err != nil {
		return err
	}
	got := 0
	for {
		if _, err := stream.Recv(); err == io.EOF {
			fmt.Println("stream", got, "OK")
			break
		} else if err != nil {
			fmt.Println("stream", got, status.Code(err))
			break
		}
		got++
	}
	_, err = c.UnimplementedCall(ctx, &testpb.Empty{})
	fmt.Println("unimplemented", status.Code(err))
	err = conn.Invoke(ctx, "/x.Nope/Method", &testpb.Empty{}, &testpb.Empty{})
	fmt.Println("unknown service", status.Code(err))
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			if _, err := c.UnaryCall(ctx, &testpb.SimpleRequest{ResponseType: testpb.PayloadType(100 + i)}); err != nil {
				errs <- err
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		return err
	}
	fmt.Println("concurrent", n)
	return nil
}

// echo makes n zerotrace.test.v1.Echo/Unary calls, three at a time on one connection:
// call i asks for status [OK, NOT_FOUND, INTERNAL][i % 3]; with GRPCSHOP_TRACEPARENT set
// each carries it in its metadata. Prints each call's code.
func echo(addr string, n int) error {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	got := make([]codes.Code, n)
	sem := make(chan struct{}, 3)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		sem <- struct{}{}
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			req := protowire.AppendString(protowire.AppendTag(nil, 1, protowire.BytesType), fmt.Sprintf("go-%d", i))
			req = protowire.AppendVarint(protowire.AppendTag(req, 2, protowire.VarintType), uint64([]int{0, 5, 13}[i%3]))
			in := new(emptypb.Empty)
			in.ProtoReflect().SetUnknown(req)
			ctx := context.Background()
			if tp := os.Getenv("GRPCSHOP_TRACEPARENT"); tp != "" {
				ctx = metadata.AppendToOutgoingContext(ctx, "traceparent", tp)
			}
			err := conn.Invoke(ctx, "/zerotrace.test.v1.Echo/Unary", in, new(emptypb.Empty))
			got[i] = status.Code(err)
		}(i)
	}
	wg.Wait()
	for i, c := range got {
		fmt.Println(i, c)
	}
	return nil
}

// load calls Echo/Unary (OK, no downstream call) from conc goroutines for d.
func load(addr string, d time.Duration, conc int) error {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	in := new(emptypb.Empty)
	in.ProtoReflect().SetUnknown(protowire.AppendString(protowire.AppendTag(nil, 1, protowire.BytesType), "x"))
	end := time.Now().Add(d)
	lat := make([][]time.Duration, conc)
	errs := make([]int, conc)
	var wg sync.WaitGroup
	for g := 0; g < conc; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for time.Now().Before(end) {
				t := time.Now()
				if err := conn.Invoke(context.Background(), "/zerotrace.test.v1.Echo/Unary", in, new(emptypb.Empty)); err != nil {
					errs[g]++
					continue
				}
				lat[g] = append(lat[g], time.Since(t))
			}
		}(g)
	}
	wg.Wait()
	var all []time.Duration
	nerr := 0
	for g := range lat {
		all = append(all, lat[g]...)
		nerr += errs[g]
	}
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	pct := func(p float64) float64 {
		if len(all) == 0 {
			return 0
		}
		return float64(all[int(p*float64(len(all)-1))].Microseconds()) / 1000
	}
	fmt.Printf("completed %d errors %d p50_ms %.3f p99_ms %.3f\n", len(all), nerr, pct(0.5), pct(0.99))
	return nil
}

// waitFor returns once file exists (polled; at most 30 s).
func waitFor(file string) {
	for end := time.Now().Add(30 * time.Second); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat(file); err == nil {
			return
		}
	}
}

func main() {
	client := len(os.Args) >= 4 && (os.Args[1] == "call" || os.Args[1] == "echo")
	if client && len(os.Args) == 5 {
		waitFor(os.Args[4])
	}
	switch {
	case len(os.Args) == 4 && os.Args[1] == "serve":
		serve(os.Args[2], os.Args[3])
	case len(os.Args) == 5 && os.Args[1] == "load":
		secs, _ := strconv.Atoi(os.Args[3])
		conc, _ := strconv.Atoi(os.Args[4])
		if err := load(os.Args[2], time.Duration(secs)*time.Second, conc); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	case client && len(os.Args) <= 5:
		n, _ := strconv.Atoi(os.Args[3])
		run := call
		if os.Args[1] == "echo" {
			run = echo
		}
		if err := run(os.Args[2], n); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	default:
		fmt.Fprintln(os.Stderr, "usage: grpcshop serve GRPC_ADDR HTTP_ADDR | grpcshop call GRPC_ADDR CONCURRENT [START] | grpcshop echo GRPC_ADDR N [START] | grpcshop load GRPC_ADDR SECONDS CONCURRENT")
		os.Exit(2)
	}
}
