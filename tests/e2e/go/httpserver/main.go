// Command httpserver is the Go HTTP service zerotrace's end-to-end tests trace: a few
// handlers with known names, statuses and durations. Usage: httpserver ADDR
package main

import (
	"fmt"
	"net/http"
	"os"
	"strconv"
	"time"
)

func hello(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "hello") }

func user(w http.ResponseWriter, r *http.Request) { fmt.Fprintf(w, "user %s", r.URL.Path) }

// sleep waits ?ms=N milliseconds before answering.
func sleep(w http.ResponseWriter, r *http.Request) {
	ms, _ := strconv.Atoi(r.URL.Query().Get("ms"))
	time.Sleep(time.Duration(ms) * time.Millisecond)
	fmt.Fprint(w, "slept")
}

// status answers with the code at the end of the path, e.g. /status/503.
func status(w http.ResponseWriter, r *http.Request) {
	code, err := strconv.Atoi(r.URL.Path[len("/status/"):])
	if err != nil || code < 100 || code > 599 {
		code = 400
	}
	w.WriteHeader(code)
	fmt.Fprint(w, "status")
}

// burnHot spins until the deadline: the hot function of the profiler tests, called
// through burnOuter -> burnMiddle -> burnHot (never inlined).
//
//go:noinline
func burnHot(until time.Time) uint64 {
	x := uint64(0x9e3779b97f4a7c15)
	for time.Now().Before(until) {
		for i := 0; i < 10000; i++ {
			x = (x<<5 | x>>59) ^ (x * 0x2545f4914f6cdd1d)
		}
	}
	return x
}

//go:noinline
func burnMiddle(until time.Time) uint64 { return burnHot(until) + 1 }

//go:noinline
func burnOuter(ms int) uint64 {
	return burnMiddle(time.Now().Add(time.Duration(ms)*time.Millisecond)) + 2
}

// burn spends ?ms=N milliseconds of CPU in the handler.
func burn(w http.ResponseWriter, r *http.Request) {
	ms, _ := strconv.Atoi(r.URL.Query().Get("ms"))
	if ms > 10000 {
		ms = 10000
	}
	fmt.Fprintf(w, "burned %d", burnOuter(ms)&1)
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: httpserver ADDR")
		os.Exit(2)
	}
	mux := http.NewServeMux()
	routes(mux)
	srv := &http.Server{Addr: os.Args[1], Handler: mux}
	fmt.Println("listening on", os.Args[1])
	if err := srv.ListenAndServe(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
