// Command hello is the smallest defuss server: a worker per CPU behind one
// public port. Run it and ask it who answered:
//
//	go run ./examples/hello
//	curl localhost:3000
//
// Everything in main before defuss.Run runs in the primary and in every
// worker, since workers are this same binary started again.
package main

import (
	"fmt"
	"log/slog"
	"net/http"
	"os"

	"github.com/defuss-go/defuss"
)

func main() {
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "Hello from worker pid %d (client %s)\n", os.Getpid(), r.RemoteAddr)
	})
	if err := defuss.Run(mux); err != nil {
		slog.Error("server stopped", "err", err)
		os.Exit(1)
	}
}
