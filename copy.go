package defuss

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// splice copies between client and worker in both directions until both
// are done, then closes both, and returns the bytes copied each way. With
// halfOpen, a clean EOF in one direction is passed on as a FIN while the
// other keeps flowing; otherwise, and on any error, the first direction to
// end closes both.
func splice(client net.Conn, worker *net.TCPConn, halfOpen bool) (up, down int64) {
	done := make(chan int64, 1)
	go copyToWorker(worker, client, halfOpen, done)
	down = copyToClient(client, worker, halfOpen)
	up = <-done
	worker.Close()
	client.Close()
	return up, down
}

// copyToWorker carries client bytes to the worker; on Linux, io.Copy
// between two *net.TCPConn uses splice(2).
func copyToWorker(worker *net.TCPConn, client net.Conn, halfOpen bool, done chan<- int64) {
	n, err := copyStream(worker, client)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		// endConnsOf: the worker has exited. End this direction only, so
		// the other one still delivers the worker's last bytes.
		worker.CloseWrite()
		done <- n
		return
	}
	endCopy(worker, client, err, halfOpen)
	done <- n
}

// copyToClient carries worker bytes to the client.
func copyToClient(client net.Conn, worker *net.TCPConn, halfOpen bool) int64 {
	n, err := copyStream(client, worker)
	endCopy(client, worker, err, halfOpen)
	return n
}

// copyStream copies src to dst until EOF, like io.Copy, without holding
// anything while src is idle: io.Copy between TCP connections keeps a
// splice pipe (two descriptors and its kernel buffer) for as long as the
// source is idle, which would triple the primary's descriptors for idle
// keep-alive connections.
//
// Between two TCP connections it reads what has arrived into a pooled
// buffer, taken only once src is readable, and writes it on: for the
// small messages of most HTTP traffic, two system calls. When a read fills
// the buffer, the rest of what is queued moves with splice(2), in the
// kernel.
func copyStream(dst, src net.Conn) (int64, error) {
	d, ok1 := dst.(*net.TCPConn)
	s, ok2 := src.(*net.TCPConn)
	if !ok1 || !ok2 {
		return io.Copy(dst, src)
	}
	rc, err := s.SyscallConn()
	if err != nil {
		return io.Copy(dst, src)
	}
	var (
		total int64
		n     int
		rerr  error
		bp    *[]byte
		lr    = io.LimitedReader{R: s}
	)
	read := func(fd uintptr) bool {
		bp = copyBufs.Get().(*[]byte)
		n, rerr = unix.Read(int(fd), *bp)
		if rerr == unix.EAGAIN {
			copyBufs.Put(bp)
			bp = nil
			return false // wait for data without a buffer
		}
		if rerr != nil {
			n, rerr = 0, os.NewSyscallError("read", rerr)
		}
		return true
	}
	queued := func(fd uintptr) { n, rerr = unix.IoctlGetInt(int(fd), unix.SIOCINQ) }
	for {
		err := rc.Read(read)
		if err == nil {
			err = rerr
		}
		if err != nil || n == 0 {
			if bp != nil {
				copyBufs.Put(bp)
			}
			return total, err // n == 0: EOF
		}
		full := n == len(*bp)
		w, err := d.Write((*bp)[:n])
		copyBufs.Put(bp)
		bp = nil
		total += int64(w)
		if err != nil {
			return total, err
		}
		if !full {
			continue
		}
		if err := rc.Control(queued); err != nil || rerr != nil || n == 0 {
			continue
		}
		lr.N = int64(n)
		m, err := d.ReadFrom(&lr)
		total += m
		if err != nil {
			return total, err
		}
	}
}

// copyBufs holds copyStream's buffers, in use only while data moves.
var copyBufs = sync.Pool{New: func() any { b := make([]byte, 16<<10); return &b }}

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
