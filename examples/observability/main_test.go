package main

import (
	"context"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/defuss-go/defuss"
)

// The test binary is also the example's worker.
func TestMain(m *testing.M) {
	if defuss.IsWorker() {
		a, err := start("", "")
		if err == nil {
			err = a.wait()
		}
		if err != nil {
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func get(t *testing.T, url string) string {
	t.Helper()
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET %s: %d %v", url, resp.StatusCode, err)
	}
	return string(b)
}

// Scraping /metrics after traffic finds the primary's counters and a
// series per worker.
func TestMetricsEndpointHasPerWorkerSeries(t *testing.T) {
	a, err := start("127.0.0.1:0", "127.0.0.1:0", defuss.WithWorkers(2), defuss.WithSignalHandling(false),
		defuss.WithHeartbeat(50*time.Millisecond, time.Second),
		defuss.WithWorkerEnv("GORACE=atexit_sleep_ms=0"))
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		a.srv.Shutdown(context.Background())
		if err := a.wait(); err != nil {
			t.Errorf("wait: %v", err)
		}
	}()
	for range 6 {
		if body := get(t, "http://"+a.srv.Addr().String()+"/"); !strings.HasPrefix(body, "Hello from worker") {
			t.Fatalf("body %q", body)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	var metrics string
	for {
		metrics = get(t, "http://"+a.adminLn.Addr().String()+"/metrics")
		if strings.Contains(metrics, `defuss_connections_accepted_total{`) &&
			strings.Contains(metrics, `defuss_worker_memory_rss_bytes{defuss_worker_index="1"`) || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	for _, want := range []string{
		`defuss_connections_accepted_total{`,
		`defuss_workers_ready{`,
		`defuss_connection_duration_seconds_count{defuss_worker_index="0"`,
		`defuss_connection_duration_seconds_count{defuss_worker_index="1"`,
		`defuss_worker_memory_rss_bytes{defuss_worker_index="0"`,
		`defuss_worker_memory_rss_bytes{defuss_worker_index="1"`,
		`defuss_worker_goroutines{defuss_worker_index="0"`,
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	if t.Failed() {
		t.Logf("/metrics:\n%s", metrics)
	}
	status := get(t, "http://"+a.adminLn.Addr().String()+"/status")
	if !strings.Contains(status, `"ready": 2`) {
		t.Errorf("/status: %s", status)
	}
}
