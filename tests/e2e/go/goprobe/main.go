// Command goprobe exists to be compiled, not run: it links every Go function zerotrace
// hooks and every struct whose layout it reads (runtime, net/http server and client,
// net/url, net, internal/poll, crypto/tls, database/sql). `cargo xtask codegen go-offsets`
// reads its DWARF for each supported Go version, and the agent's symbol tests build it
// stripped, PIE and with cgo to check the pclntab and runtime type lookups.
// Run with no arguments it does nothing; with "serve ADDR" it serves HTTP.
package main

import (
	"context"
	"crypto/tls"
	"database/sql"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
)

type handler struct{ ch chan int }

func (h handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// A buffered and an unbuffered channel, and a select: runtime.chansend/chanrecv,
	// send/recv and selectgo are all linked.
	go func() { h.ch <- len(r.URL.Path) }()
	select {
	case n := <-h.ch:
		fmt.Fprintf(w, "%s %d %s %s", r.Method, n, r.URL.Scheme, r.URL.Host)
	case <-r.Context().Done():
	}
}

func main() {
	if len(os.Args) < 3 {
		return
	}
	switch os.Args[1] {
	case "serve":
		mux := http.NewServeMux()
		mux.Handle("/", handler{ch: make(chan int, 1)})
		_ = http.ListenAndServe(os.Args[2], mux)
	case "get":
		resp, err := http.Get(os.Args[2])
		if err == nil {
			fmt.Println(resp.StatusCode)
			resp.Body.Close()
		}
		u, _ := url.Parse(os.Args[2])
		fmt.Println(u.Scheme, u.Host, u.Path)
	case "tls":
		c, err := net.Dial("tcp", os.Args[2])
		if err != nil {
			return
		}
		tc := tls.Client(c, &tls.Config{InsecureSkipVerify: true})
		_, _ = tc.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
		buf := make([]byte, 512)
		_, _ = tc.Read(buf)
		if t, ok := c.(*net.TCPConn); ok {
			_ = t.Close()
		}
	case "sql":
		db, err := sql.Open(os.Args[2], "")
		if err != nil {
			return
		}
		ctx := context.Background()
		if rows, err := db.QueryContext(ctx, "select 1"); err == nil {
			rows.Close()
		}
		_, _ = db.ExecContext(ctx, "select 1")
	}
}
