// Command tls serves HTTPS with HTTP/2 from a worker per CPU, on a
// self-signed certificate made at start:
//
//	go run ./examples/tls
//	curl -k https://localhost:3443
//	curl -k --http2 -sI https://localhost:3443 | head -1
//
// The primary passes TLS through (it reads only the server name, for the
// Balancer); each worker terminates TLS with the program's own
// http.Server settings, given with defuss.WithServer.
//
// Everything in main before defuss.Run runs in every process: here each
// worker makes a certificate of its own, which is fine for a demo. A real
// program loads its certificate from disk in main; to renew it, replace
// the files and send SIGHUP to the primary (a rolling restart).
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/defuss-go/defuss"
)

func main() {
	cert, err := selfSigned()
	if err != nil {
		slog.Error("certificate", "err", err)
		os.Exit(1)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "Hello over %s, TLS %v, from worker pid %d (client %s)\n", r.Proto, r.TLS != nil, os.Getpid(), r.RemoteAddr)
	})
	srv := &http.Server{
		Addr:              ":3443",
		Handler:           mux,
		ReadHeaderTimeout: 5 * time.Second,
		IdleTimeout:       time.Minute,
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{cert}},
	}
	err = defuss.Run(nil, defuss.WithServer(srv))
	if errors.Is(err, defuss.ErrNotSupported) { // Windows: one process
		slog.Warn("no worker processes on this platform; serving in one process", "err", err)
		err = srv.ListenAndServeTLS("", "")
	}
	if err != nil {
		slog.Error("server stopped", "err", err)
		os.Exit(1)
	}
}

// selfSigned makes a certificate for localhost, 127.0.0.1 and ::1.
func selfSigned() (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: "localhost"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}
