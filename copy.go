package defuss

import (
	"errors"
	"net"
	"os"
	"sync/atomic"
	"time"
)

// finTimeout is how long the primary waits for a client to send more, or
// to close its side of a spliced connection, once the worker has closed
// its own.
const finTimeout = time.Second

// splice copies between client and worker in both directions until both
// are done, then closes both, and returns the bytes copied each way. With
// halfOpen, a clean EOF in one direction is passed on as a FIN while the
// other keeps flowing; otherwise, and on any error, the first direction to
// end closes both. Once the worker has finished sending, the client's
// direction ends after finTimeout without a byte.
func splice(client net.Conn, worker *net.TCPConn, halfOpen bool) (up, down int64) {
	var fin atomic.Bool // the worker has finished sending
	done := make(chan int64, 1)
	go copyToWorker(worker, client, halfOpen, &fin, done)
	down = copyToClient(client, worker, halfOpen)
	// A client that neither sends nor closes after the worker closed (an
	// idle keep-alive connection the worker closed at its IdleTimeout, a
	// head cut at its ReadHeaderTimeout) would hold the connection here
	// forever. One that still sends (a tunnel that half-closed) gets
	// finTimeout more after every chunk.
	fin.Store(true)
	client.SetReadDeadline(time.Now().Add(finTimeout))
	up = <-done
	worker.Close()
	client.Close()
	return up, down
}

// copyToWorker carries client bytes to the worker (copyStream: splice(2)
// for bulk data on Linux).
func copyToWorker(worker *net.TCPConn, client net.Conn, halfOpen bool, fin *atomic.Bool, done chan<- int64) {
	n, err := copyStream(worker, client, fin)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		// conns.endOf (the worker has exited) or finTimeout (it closed):
		// end this direction only, so that the other one still delivers
		// the worker's last bytes.
		worker.CloseWrite()
		done <- n
		return
	}
	endCopy(worker, client, err, halfOpen)
	done <- n
}

// copyToClient carries worker bytes to the client.
func copyToClient(client net.Conn, worker *net.TCPConn, halfOpen bool) int64 {
	n, err := copyStream(client, worker, nil)
	endCopy(client, worker, err, halfOpen)
	return n
}

// endCopy ends one direction: src has been read to EOF (err nil) or failed.
func endCopy(dst, src net.Conn, err error, halfOpen bool) {
	if err == nil && halfOpen {
		if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
			return
		}
	}
	dst.Close()
	src.Close()
}
