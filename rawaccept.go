package defuss

import (
	"net"
	"os"
	"syscall"
	"time"
)

// fileConn is a client socket that the raw accept loop (Linux) passes on
// to route as a net.Conn when it cannot serve it at once: an *os.File, in
// Go's poller like any socket, with the addresses the loop already knows.
// It spares the connection what net.FileConn costs: a second descriptor,
// five socket options and three queries.
// The file is not embedded: its Fd would make the socket blocking.
//
// In splice mode the loop routes a connection itself with a fileConn
// that has no file, only fd, the raw descriptor: a key for the
// connection table, whose Close does nothing (the relay owns fd).
type fileConn struct {
	f            *os.File
	fd           int // the descriptor; the relay's when there is no f
	laddr, raddr *net.TCPAddr
	optsSet      bool // accepted from a listener that gave it net's options
}

var _ net.Conn = (*fileConn)(nil)

func (c *fileConn) Read(b []byte) (int, error)  { return c.f.Read(b) }
func (c *fileConn) Write(b []byte) (int, error) { return c.f.Write(b) }
func (c *fileConn) Close() error {
	if c.f == nil {
		return nil // the relay closes fd
	}
	return c.f.Close()
}
func (c *fileConn) LocalAddr() net.Addr                { return c.laddr }
func (c *fileConn) RemoteAddr() net.Addr               { return c.raddr }
func (c *fileConn) SetDeadline(t time.Time) error      { return c.f.SetDeadline(t) }
func (c *fileConn) SetReadDeadline(t time.Time) error  { return c.f.SetReadDeadline(t) }
func (c *fileConn) SetWriteDeadline(t time.Time) error { return c.f.SetWriteDeadline(t) }
func (c *fileConn) SyscallConn() (syscall.RawConn, error) {
	return c.f.SyscallConn()
}

// rawGrace is how long the raw accept loop keeps a connection whose head
// has not arrived when it is accepted, waking for each arrival of its
// bytes, before it gives the connection to route. A client sends its head right
// after the handshake: it is there within microseconds, as a rule.
const rawGrace = 2 * time.Millisecond
