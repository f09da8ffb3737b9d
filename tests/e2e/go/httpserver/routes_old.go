//go:build !go1.22

package main

import "net/http"

// Before Go 1.22 ServeMux has no patterns: prefix routes only, no route is reported.
func routes(mux *http.ServeMux) {
	mux.HandleFunc("/hello", hello)
	mux.HandleFunc("/users/", user)
	mux.HandleFunc("/sleep", sleep)
	mux.HandleFunc("/burn", burn)
	mux.HandleFunc("/status/", status)
}
