// Command observability is the hello server plus an admin listener on a
// private address that serves the primary's OpenTelemetry metrics in the
// Prometheus format at /metrics and the worker pool's state at /status:
//
//	go run ./examples/observability          (from examples/observability)
//	curl localhost:3000
//	curl localhost:9090/metrics
//	curl localhost:9090/status
//
// ADDR and ADMIN_ADDR override the two addresses. The admin listener runs
// in the primary only: the primary sees the whole pool through heartbeats,
// so one scrape covers every worker.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/defuss-go/defuss"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
)

func main() {
	a, err := start(env("ADDR", ":3000"), env("ADMIN_ADDR", "127.0.0.1:9090"))
	if err == nil {
		err = a.wait()
	}
	if err != nil {
		slog.Error("stopped", "err", err)
		os.Exit(1)
	}
}

func env(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

func hello(w http.ResponseWriter, r *http.Request) {
	fmt.Fprintf(w, "Hello from worker pid %d\n", os.Getpid())
}

// app is the running server: in the primary also the admin listener.
type app struct {
	srv     *defuss.Server
	admin   *http.Server
	adminLn net.Listener
	mp      *sdkmetric.MeterProvider
}

// start starts the defuss server and, in the primary, the admin listener.
func start(addr, adminAddr string, opts ...defuss.Option) (*app, error) {
	mux := http.NewServeMux()
	mux.HandleFunc("/", hello)
	if defuss.IsWorker() {
		srv, err := defuss.Start(mux, opts...)
		if err != nil {
			return nil, err
		}
		return &app{srv: srv}, nil
	}

	reg := prometheus.NewRegistry()
	exporter, err := otelprom.New(otelprom.WithRegisterer(reg))
	if err != nil {
		return nil, err
	}
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(exporter))
	opts = append([]defuss.Option{defuss.WithAddr(addr), defuss.WithMeterProvider(mp)}, opts...)
	srv, err := defuss.Start(mux, opts...)
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", adminAddr)
	if err != nil {
		srv.Shutdown(context.Background())
		return nil, err
	}
	admin := http.NewServeMux()
	admin.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	admin.Handle("/status", defuss.StatusHandler(srv))
	a := &app{srv: srv, admin: &http.Server{Handler: admin, ReadHeaderTimeout: 10 * time.Second}, adminLn: ln, mp: mp}
	go a.admin.Serve(ln)
	return a, nil
}

// wait blocks until the server stops, then closes the admin listener.
func (a *app) wait() error {
	err := a.srv.Wait()
	if a.admin != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if aerr := a.admin.Shutdown(ctx); aerr != nil && !errors.Is(aerr, http.ErrServerClosed) {
			err = errors.Join(err, aerr)
		}
		a.mp.Shutdown(ctx)
	}
	return err
}
