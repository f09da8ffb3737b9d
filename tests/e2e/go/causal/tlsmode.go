// HTTPS for the span-tree tests: a self-signed certificate made on demand, servers that
// serve TLS when given one, clients that trust it, and a client mode that sends requests
// from a process of its own (not traced) over one keep-alive connection.
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"
)

// genCert writes cert.pem and key.pem into dir: a self-signed certificate for 127.0.0.1
// and localhost that is its own CA (so clients can trust exactly it).
func genCert(dir string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: "zerotrace e2e"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1")},
		DNSNames:              []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return err
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "cert.pem"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "key.pem"), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600)
}

// tlsDir is CAUSAL_TLS_DIR: where cert.pem and key.pem are ("" : plain HTTP).
func tlsDir() string { return os.Getenv("CAUSAL_TLS_DIR") }

// httpClient trusts the test certificate when there is one. A Transport with its own
// TLS config speaks HTTP/1.1 (HTTP/2 is only attempted by the default one).
func httpClient() *http.Client {
	c := &http.Client{Timeout: 5 * time.Second}
	if d := tlsDir(); d != "" {
		pem, err := os.ReadFile(filepath.Join(d, "cert.pem"))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(pem)
		// CAUSAL_H2=1: negotiate HTTP/2 as browsers and curl do.
		c.Transport = &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: os.Getenv("CAUSAL_H2") != ""}
	}
	return c
}

// serve serves srv over TLS when there is a certificate (HTTP/2 stays enabled, as in any
// Go HTTPS server), else plain HTTP.
func serve(srv *http.Server) error {
	if d := tlsDir(); d != "" {
		return srv.ListenAndServeTLS(filepath.Join(d, "cert.pem"), filepath.Join(d, "key.pem"))
	}
	return srv.ListenAndServe()
}

// getAll GETs each URL in turn (one keep-alive connection per host) and prints each
// status code; exits 1 on a transport error.
func getAll(urls []string) {
	c := httpClient()
	for _, u := range urls {
		resp, err := c.Get(u)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		fmt.Println(resp.StatusCode)
	}
}
