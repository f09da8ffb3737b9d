//go:build go1.22

package main

import "net/http"

// Go 1.22+ ServeMux patterns: method and wildcards, reported as the route.
func routes(mux *http.ServeMux) {
	mux.HandleFunc("GET /hello", hello)
	mux.HandleFunc("GET /users/{id}", user)
	mux.HandleFunc("/sleep", sleep)
	mux.HandleFunc("/burn", burn)
	mux.HandleFunc("/status/", status)
}
