//go:build unix

package defuss

import (
	"net"
	"testing"
	"time"
)

// Issue 11, point 15: a worker that stops reading its hand-off socket
// (stopped, or stuck) must not block the primary's routing goroutines
// until it is killed: once its queue is full, sendConn fails within the
// hand-off timeout and the connection goes to the next worker.
func TestSendConnToFullQueueTimesOut(t *testing.T) {
	ours, theirs, err := handoffPair()
	if err != nil {
		t.Fatal(err)
	}
	defer ours.Close()
	defer theirs.Close() // nobody reads it
	client, server := tcpPair(t)
	defer client.Close()
	defer server.Close()
	failed := make(chan error, 1)
	go func() {
		for {
			if err := sendConn(ours, server.(*net.TCPConn)); err != nil {
				failed <- err
				return
			}
		}
	}()
	select {
	case err := <-failed:
		t.Logf("send to a full queue: %v", err)
	case <-time.After(10 * time.Second):
		ours.Close() // unblock the sender
		<-failed
		t.Fatal("sendConn still blocked on a full hand-off queue after 10s")
	}
}
