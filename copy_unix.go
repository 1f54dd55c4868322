//go:build unix

package defuss

import (
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// copyStream copies src to dst until EOF, like io.Copy, without holding
// anything while src is idle: io.Copy between TCP connections keeps a
// splice pipe (two descriptors and its kernel buffer) for as long as the
// source is idle, which would triple the primary's descriptors for idle
// keep-alive connections.
//
// Between two TCP connections it reads what has arrived into a pooled
// buffer, taken only once src is readable, and writes it on: for the
// small messages of most HTTP traffic, two system calls. When a read fills
// the buffer, the rest of what is queued may move in the kernel
// (spliceQueued: splice(2) on Linux; elsewhere the loop reads on).
func copyStream(dst, src net.Conn, fin *atomic.Bool) (int64, error) {
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
		if fin != nil && fin.Load() {
			s.SetReadDeadline(time.Now().Add(finTimeout)) // still sending: more time
		}
		if !full {
			continue
		}
		m, err := spliceQueued(rc, d, &lr)
		total += m
		if err != nil {
			return total, err
		}
	}
}

// copyBufs holds copyStream's buffers, in use only while data moves.
var copyBufs = sync.Pool{New: func() any { b := make([]byte, 16<<10); return &b }}
