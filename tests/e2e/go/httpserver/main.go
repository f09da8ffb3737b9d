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
