//go:build linux

package defuss

import (
	"io"
	"io/fs"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// sendFileChunk bounds one sendfile call.
const sendFileChunk = 4 << 20

// rawSendFile is sendFile on raw's socket when raw is a rawStream; it has
// not handled r otherwise.
func rawSendFile(raw io.ReadWriter, r io.Reader) (int64, bool, error) {
	s, ok := raw.(*rawStream)
	if !ok {
		return 0, false, nil
	}
	return sendFile(s.rc, r)
}

// sendFile sends r, a regular file, with sendfile(2) from its offset to
// the socket dst, waiting in Go's poller while dst's send buffer is full
// (the socket's write lock held, as net's own sendfile holds it). It has
// not handled r when r is no regular file (an *os.File, or os's wrapper
// of one that io.Copy passes on), or one sendfile cannot send from:
// nothing is sent then. (The loop takes EAGAIN for dst's: the check keeps
// it to the sources sendfile is for.) A handed-off connection's ReadFrom
// sends with it, and so does a splice-mode worker's connection on its
// Unix socket, where net's copy would go through user space for a part
// of a file, which is what http.ServeFile sends.
//
// As net's sendfile: sendfile(2) takes no MSG_NOSIGNAL, so a send to a
// gone peer raises SIGPIPE, which Go ignores for a socket (a program
// that asked for SIGPIPE with signal.Notify sees it); and on a socket
// made blocking (a hijacking handler's Fd on its File) it blocks in the
// kernel, past any deadline, where sendRaw's MSG_DONTWAIT would not.
func sendFile(dst syscall.RawConn, r io.Reader) (written int64, handled bool, err error) {
	remain := int64(1<<63 - 1)
	lr, limited := r.(*io.LimitedReader)
	if limited {
		remain, r = lr.N, lr.R
		if remain <= 0 {
			return 0, true, nil
		}
	}
	f, ok := r.(interface {
		syscall.Conn
		Stat() (fs.FileInfo, error)
	})
	if !ok {
		return 0, false, nil
	}
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
		return 0, false, nil
	}
	src, err := f.SyscallConn()
	if err != nil {
		return 0, false, nil
	}
	var errno, werr error
	cerr := src.Control(func(in uintptr) {
		werr = dst.Write(func(out uintptr) bool {
			for remain > 0 {
				n, err := unix.Sendfile(int(out), int(in), nil, int(min(remain, sendFileChunk)))
				if n > 0 {
					written += int64(n)
					remain -= int64(n)
				}
				switch {
				case err == unix.EINTR:
				case err == unix.EAGAIN:
					return false // dst's send buffer is full: wait for room
				case err != nil:
					errno = err
					return true
				case n == 0:
					return true // the file's end
				}
			}
			return true
		})
	})
	if limited {
		lr.N -= written
	}
	switch {
	case written == 0 && (errno == unix.EINVAL || errno == unix.ENOSYS || errno == unix.EOPNOTSUPP):
		return 0, false, nil // not a file sendfile sends from: copied
	case errno != nil:
		err = os.NewSyscallError("sendfile", errno)
	case werr != nil:
		err = werr
	default:
		err = cerr
	}
	return written, true, err
}
