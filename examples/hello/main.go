// Command hello is the smallest defuss server: a worker per CPU behind one
// public port. Run it and ask it who answered:
//
//	go run ./examples/hello
//	curl localhost:3000
//
// Everything in main before defuss.Run runs in the primary and in every
// worker, since workers are this same binary started again.
//
// On Windows, where defuss cannot start workers, it serves in one process.
package main

import (
	"errors"
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
	err := defuss.Run(mux)
	if errors.Is(err, defuss.ErrNotSupported) {
		slog.Warn("no worker processes on this platform; serving in one process", "err", err)
		err = http.ListenAndServe(":3000", mux)
	}
	if err != nil {
		slog.Error("server stopped", "err", err)
		os.Exit(1)
	}
}
