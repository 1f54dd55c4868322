//go:build !unix

package defuss

import (
	"errors"
	"net/http"
	"testing"
)

// On a platform without inherited pipes (Windows), Start and Run refuse
// with ErrNotSupported before they bind or spawn anything, so that main can
// fall back to serving in one process (see the package doc).
func TestStartNotSupported(t *testing.T) {
	if _, err := Start(http.NotFoundHandler(), WithAddr("127.0.0.1:0")); !errors.Is(err, ErrNotSupported) {
		t.Fatalf("Start: got %v, want ErrNotSupported", err)
	}
	if err := Run(http.NotFoundHandler(), WithAddr("127.0.0.1:0")); !errors.Is(err, ErrNotSupported) {
		t.Fatalf("Run: got %v, want ErrNotSupported", err)
	}
	if IsWorker() {
		t.Fatal("IsWorker: true in a test process")
	}
}
