package defuss

import (
	"net"
	"os"
	"time"
)

// fileConn is a client socket that the raw accept loop (Linux, hand-off
// mode) passes on to route as a net.Conn when it cannot hand it off at
// once: an *os.File, in Go's poller like any socket, with the addresses
// the loop already knows. It spares the connection what net.FileConn
// costs: a second descriptor, four socket options and three queries.
type fileConn struct {
	*os.File
	laddr, raddr *net.TCPAddr
}

var _ net.Conn = (*fileConn)(nil)

func (c *fileConn) LocalAddr() net.Addr  { return c.laddr }
func (c *fileConn) RemoteAddr() net.Addr { return c.raddr }

// rawGrace is how long the raw accept loop keeps a connection whose head
// has not arrived when it is accepted, looking again each time it wakes,
// before it gives the connection to route. A client sends its head right
// after the handshake: it is there within microseconds, as a rule.
const rawGrace = 2 * time.Millisecond
