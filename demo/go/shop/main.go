// Command shop is zerotrace's demo: a small Go web shop of two services and a load
// generator, each its own process (`cargo xtask demo` adds Rust services next to it).
//
//	shop catalog  ADDR                 item lookups (1-3 ms, 404 for unknown items)
//	shop frontend ADDR CATALOG_ADDR [REVIEWS_ADDR]
//	                                   pages, product pages that ask the catalog (and the
//	                                   reviews service, when given), checkout
//	shop load     FRONTEND_ADDR RPS    a steady mix of requests, keep-alive
//
// The frontend also serves /noop, /work (a 1 ms handler) and /fanout (three goroutines
// answering over a channel) for `cargo xtask bench overhead`.
package main

import (
	"fmt"
	"io"
	"math/rand"
	"net/http"
	"os"
	"strconv"
	"time"
)

func catalog(addr string) error {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /items/{id}", func(w http.ResponseWriter, r *http.Request) {
		id, err := strconv.Atoi(r.PathValue("id"))
		time.Sleep(time.Duration(1+rand.Intn(3)) * time.Millisecond)
		if err != nil || id > 100 {
			http.Error(w, "no such item", http.StatusNotFound)
			return
		}
		fmt.Fprintf(w, `{"id":%d,"name":"item %d","price":%d}`, id, id, 100+id)
	})
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "ok") })
	return http.ListenAndServe(addr, mux)
}

func frontend(addr, catalogAddr, reviewsAddr string) error {
	client := &http.Client{Timeout: 2 * time.Second}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "welcome to the shop") })
	mux.HandleFunc("GET /products/{id}", func(w http.ResponseWriter, r *http.Request) {
		resp, err := client.Get("http://" + catalogAddr + "/items/" + r.PathValue("id"))
		if err != nil {
			http.Error(w, "catalog unavailable", http.StatusBadGateway)
			return
		}
		defer resp.Body.Close()
		if reviewsAddr != "" {
			// The reviews service (Rust) asks the ratings service (Rust, gRPC) in turn.
			if rv, err := client.Get("http://" + reviewsAddr + "/grpc/" + r.PathValue("id")); err == nil {
				io.Copy(io.Discard, rv.Body)
				rv.Body.Close()
			}
		}
		w.WriteHeader(resp.StatusCode)
		io.Copy(w, resp.Body)
	})
	mux.HandleFunc("POST /cart/{id}", func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(time.Duration(2+rand.Intn(4)) * time.Millisecond)
		fmt.Fprint(w, "added")
	})
	mux.HandleFunc("GET /checkout", func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(10 * time.Millisecond)
		if rand.Intn(10) == 0 {
			http.Error(w, "payment provider timeout", http.StatusInternalServerError)
			return
		}
		fmt.Fprint(w, "paid")
	})
	mux.HandleFunc("GET /noop", func(w http.ResponseWriter, r *http.Request) {})
	mux.HandleFunc("GET /work", func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(time.Millisecond)
		fmt.Fprint(w, "done")
	})
	// Three goroutines compute parts of the answer and hand them back over a channel.
	mux.HandleFunc("GET /fanout", func(w http.ResponseWriter, r *http.Request) {
		parts := make(chan int)
		for i := 1; i <= 3; i++ {
			go func(i int) { parts <- i * i }(i)
		}
		sum := 0
		for i := 0; i < 3; i++ {
			sum += <-parts
		}
		fmt.Fprint(w, sum)
	})
	return http.ListenAndServe(addr, mux)
}

func load(frontendAddr string, rps int) error {
	client := &http.Client{Timeout: 5 * time.Second}
	base := "http://" + frontendAddr
	tick := time.NewTicker(time.Second / time.Duration(rps))
	defer tick.Stop()
	for range tick.C {
		var req *http.Request
		switch n := rand.Intn(10); {
		case n < 3:
			req, _ = http.NewRequest("GET", base+"/", nil)
		case n < 7:
			req, _ = http.NewRequest("GET", base+"/products/"+strconv.Itoa(1+rand.Intn(120)), nil)
		case n < 9:
			req, _ = http.NewRequest("POST", base+"/cart/"+strconv.Itoa(1+rand.Intn(100)), nil)
		default:
			req, _ = http.NewRequest("GET", base+"/checkout", nil)
		}
		go func() {
			resp, err := client.Do(req)
			if err == nil {
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
		}()
	}
	return nil
}

func main() {
	var err error
	switch {
	case len(os.Args) == 3 && os.Args[1] == "catalog":
		err = catalog(os.Args[2])
	case len(os.Args) == 4 && os.Args[1] == "frontend":
		err = frontend(os.Args[2], os.Args[3], "")
	case len(os.Args) == 5 && os.Args[1] == "frontend":
		err = frontend(os.Args[2], os.Args[3], os.Args[4])
	case len(os.Args) == 4 && os.Args[1] == "load":
		rps, _ := strconv.Atoi(os.Args[3])
		err = load(os.Args[2], max(rps, 1))
	default:
		fmt.Fprintln(os.Stderr, "usage: shop catalog ADDR | shop frontend ADDR CATALOG_ADDR [REVIEWS_ADDR] | shop load FRONTEND_ADDR RPS")
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
