// Command h2cshop is the HTTP/2-in-the-clear service of zerotrace's Go HTTP/2 tests: a
// net/http handler behind golang.org/x/net/http2/h2c (prior knowledge and Upgrade), built
// from the offline module sources. /leaf/ answers; /call/ calls DOWNSTREAM/leaf/<id> with
// Go's own client over unencrypted HTTP/2 (Go 1.24+), so a tree crosses two h2c servers.
//
// Usage: h2cshop ADDR [DOWNSTREAM_BASE_URL]
package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: h2cshop ADDR [DOWNSTREAM_BASE_URL]")
		os.Exit(2)
	}
	down := ""
	if len(os.Args) > 2 {
		down = os.Args[2]
	}
	tr := &http.Transport{}
	tr.Protocols = new(http.Protocols)
	tr.Protocols.SetUnencryptedHTTP2(true)
	client := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	mux := http.NewServeMux()
	mux.HandleFunc("/leaf/", func(w http.ResponseWriter, r *http.Request) {
		if strings.HasSuffix(r.URL.Path, "/missing") {
			w.WriteHeader(http.StatusNotFound)
		}
		fmt.Fprintf(w, "%s %s\n", r.Proto, r.URL.Path)
	})
	mux.HandleFunc("/call/", func(w http.ResponseWriter, r *http.Request) {
		resp, err := client.Get(down + "/leaf/" + strings.TrimPrefix(r.URL.Path, "/call/"))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		w.WriteHeader(resp.StatusCode)
		fmt.Fprintln(w, resp.Proto)
	})
	srv := &http.Server{Addr: os.Args[1], Handler: h2c.NewHandler(mux, &http2.Server{})}
	if err := srv.ListenAndServe(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
