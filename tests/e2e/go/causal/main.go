// Command causal is the Go service of zerotrace's span-tree tests: handlers that hand work
// to other goroutines in every way Go programs do (spawn, WaitGroup fan-out, worker pools
// over unbuffered and buffered channels, select with a timeout) and call a downstream
// service over HTTP from there. Every path ends in an id that the downstream call repeats,
// so a test can check that each downstream span sits under the request that caused it.
//
// Usage: causal ADDR [DOWNSTREAM_BASE_URL]. Without a downstream it serves /leaf/ only
// (and /status/); with one, the routes below call DOWNSTREAM/leaf/<route>-<id>. With
// CAUSAL_TLS_DIR set it serves HTTPS and trusts that certificate as a client (tlsmode.go).
// Also: causal gencert DIR; causal get URL... (a client of its own).
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

var (
	down   string
	client = httpClient()
)

// call GETs the downstream path and returns its status code (0 on a transport error).
func call(path string) int {
	resp, err := client.Get(down + path)
	if err != nil {
		return 0
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

func idOf(r *http.Request, prefix string) string { return strings.TrimPrefix(r.URL.Path, prefix) }

func answer(w http.ResponseWriter, codes ...int) {
	for _, c := range codes {
		if c != 200 {
			w.WriteHeader(http.StatusBadGateway)
			fmt.Fprint(w, "downstream failed")
			return
		}
	}
	fmt.Fprint(w, "ok")
}

// sync: the handler itself calls downstream.
func syncCall(w http.ResponseWriter, r *http.Request) {
	answer(w, call("/leaf/sync-"+idOf(r, "/sync/")))
}

// fanout: three spawned goroutines call downstream; a WaitGroup joins them.
func fanout(w http.ResponseWriter, r *http.Request) {
	id := idOf(r, "/fanout/")
	codes := make([]int, 3)
	var wg sync.WaitGroup
	for i := 0; i < 3; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			codes[i] = call(fmt.Sprintf("/leaf/fanout-%s-%d", id, i))
		}(i)
	}
	wg.Wait()
	answer(w, codes...)
}

// nested: a goroutine spawns a goroutine that spawns the one that calls downstream.
func nested(w http.ResponseWriter, r *http.Request) {
	id := idOf(r, "/nested/")
	done := make(chan int)
	go func() {
		go func() {
			go func() { done <- call("/leaf/nested-" + id) }()
		}()
	}()
	answer(w, <-done)
}

type job struct {
	path  string
	reply chan int
}

// Long-lived worker pools, started before any request: their goroutines inherit nothing.
var (
	unbuffered = make(chan job)
	buffered   = make(chan job, 16)
	selecting  = make(chan job)
)

func workers() {
	for i := 0; i < 2; i++ {
		go func() {
			for j := range unbuffered {
				j.reply <- call(j.path)
			}
		}()
		go func() {
			for j := range buffered {
				j.reply <- call(j.path)
			}
		}()
		go func() {
			idle := time.NewTicker(time.Hour)
			for {
				select {
				case j := <-selecting:
					j.reply <- call(j.path)
				case <-idle.C:
				}
			}
		}()
	}
}

func worker(pool chan job, prefix string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		j := job{path: "/leaf/" + prefix + "-" + idOf(r, "/"+prefix+"/"), reply: make(chan int, 1)}
		pool <- j
		answer(w, <-j.reply)
	}
}

// selectTimeout: a select whose slow branch loses to a timeout, then a downstream call;
// and a select that sends a job to a worker that is itself waiting in a select.
func selectTimeout(w http.ResponseWriter, r *http.Request) {
	id := idOf(r, "/select/")
	slow := make(chan int, 1)
	go func() {
		time.Sleep(200 * time.Millisecond)
		slow <- 1
	}()
	timedOut := false
	select {
	case <-slow:
	case <-time.After(20 * time.Millisecond):
		timedOut = true
	}
	if !timedOut {
		http.Error(w, "no timeout", 500)
		return
	}
	first := call("/leaf/select-timeout-" + id)
	j := job{path: "/leaf/select-worker-" + id, reply: make(chan int, 1)}
	select {
	case selecting <- j:
	case <-time.After(2 * time.Second):
		http.Error(w, "no worker", 500)
		return
	}
	answer(w, first, <-j.reply)
}

// fail: a call to a port nobody listens on (a transport error).
func fail(w http.ResponseWriter, r *http.Request) {
	resp, err := client.Get("http://127.0.0.1:1/unreachable")
	if err == nil {
		resp.Body.Close()
	}
	w.WriteHeader(http.StatusBadGateway)
	fmt.Fprint(w, "unreachable")
}

// err5xx: the downstream answers 503; this handler answers 500.
func err5xx(w http.ResponseWriter, r *http.Request) {
	call("/status/503")
	w.WriteHeader(http.StatusInternalServerError)
	fmt.Fprint(w, "downstream 503")
}

// sqlCalls: a query, an update and a failing query inside the handler, then a query from a
// spawned goroutine.
func sqlCalls(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	var name string
	if err := db.QueryRowContext(ctx, "SELECT name FROM items WHERE id = ?", idOf(r, "/sql/")).Scan(&name); err != nil {
		http.Error(w, err.Error(), 500)
		return
	}
	if _, err := db.ExecContext(ctx, "UPDATE stock SET n = n - 1 WHERE id = ?", idOf(r, "/sql/")); err != nil {
		http.Error(w, err.Error(), 500)
		return
	}
	if _, err := db.QueryContext(ctx, "SELECT x FROM broken"); err == nil {
		http.Error(w, "expected an error", 500)
		return
	}
	done := make(chan struct{})
	go func() {
		db.ExecContext(context.Background(), "INSERT INTO audit(id) VALUES (?)", 1)
		close(done)
	}()
	<-done
	fmt.Fprint(w, name)
}

func leaf(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "leaf") }

// echo answers with the traceparent headers the request carried, comma-separated.
func echo(w http.ResponseWriter, r *http.Request) {
	fmt.Fprint(w, strings.Join(r.Header.Values("Traceparent"), ","))
}

// fetch sends req and returns the body (or the error's text).
func fetch(req *http.Request) string {
	resp, err := client.Do(req)
	if err != nil {
		return "error: " + err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// chain: with a downstream, forward /chain/ID there and answer with what it answered;
// at the end of the chain, echo.
func chain(w http.ResponseWriter, r *http.Request) {
	if down == "" {
		echo(w, r)
		return
	}
	req, _ := http.NewRequest("GET", down+r.URL.Path, nil)
	fmt.Fprint(w, fetch(req))
}

// ownCtx: a request that carries the application's own traceparent.
func ownCtx(w http.ResponseWriter, r *http.Request) {
	req, _ := http.NewRequest("GET", down+"/echo/"+idOf(r, "/ownctx/"), nil)
	req.Header.Set("Traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
	fmt.Fprint(w, fetch(req))
}

// secrets: a downstream call that carries credentials in its query and headers (none of
// which may reach exported spans).
func secrets(w http.ResponseWriter, r *http.Request) {
	req, _ := http.NewRequest("GET", down+"/leaf/q-"+idOf(r, "/creds/")+"?token=secret-client-query", nil)
	req.Header.Set("Authorization", "Bearer secret-client-auth")
	req.Header.Set("Cookie", "session=secret-client-cookie")
	fmt.Fprint(w, fetch(req))
}

// full: a request whose head fills the client's 4096-byte write buffer to 16 bytes short
// before its headers are written (request line, Host and a long User-Agent).
func full(w http.ResponseWriter, r *http.Request) {
	u := down + "/echo/" + idOf(r, "/full/")
	req, _ := http.NewRequest("GET", u, nil)
	used := len("GET "+req.URL.RequestURI()+" HTTP/1.1\r\n") + len("Host: "+req.URL.Host+"\r\n") + len("User-Agent: \r\n")
	req.Header.Set("User-Agent", strings.Repeat("x", 4096-16-used))
	fmt.Fprint(w, fetch(req))
}

func status(w http.ResponseWriter, r *http.Request) {
	code, err := strconv.Atoi(strings.TrimPrefix(r.URL.Path, "/status/"))
	if err != nil || code < 100 || code > 599 {
		code = 400
	}
	w.WriteHeader(code)
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: causal ADDR [DOWNSTREAM_BASE_URL] | gencert DIR | get URL...")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "gencert":
		if err := genCert(os.Args[2]); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		return
	case "get":
		getAll(os.Args[2:])
		return
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/leaf/", leaf)
	mux.HandleFunc("/status/", status)
	mux.HandleFunc("/echo/", echo)
	mux.HandleFunc("/chain/", chain)
	if len(os.Args) > 2 {
		mux.HandleFunc("/ownctx/", ownCtx)
		mux.HandleFunc("/full/", full)
		mux.HandleFunc("/creds/", secrets)
		down = strings.TrimSuffix(os.Args[2], "/")
		workers()
		mux.HandleFunc("/sync/", syncCall)
		mux.HandleFunc("/fanout/", fanout)
		mux.HandleFunc("/nested/", nested)
		mux.HandleFunc("/unbuffered/", worker(unbuffered, "unbuffered"))
		mux.HandleFunc("/buffered/", worker(buffered, "buffered"))
		mux.HandleFunc("/select/", selectTimeout)
		mux.HandleFunc("/fail/", fail)
		mux.HandleFunc("/err5xx/", err5xx)
		mux.HandleFunc("/sql/", sqlCalls)
	}
	srv := &http.Server{Addr: os.Args[1], Handler: mux}
	fmt.Println("listening on", os.Args[1])
	err := serve(srv)
	if err != nil && !errors.Is(err, http.ErrServerClosed) {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
