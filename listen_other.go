//go:build !linux

package defuss

import "net"

// listenConfig is how the primary opens its public socket: with net's
// defaults, which set TCP keep-alive on each accepted connection. (On
// Linux the listening socket carries it; see listen_linux.go.)
func listenConfig() net.ListenConfig { return net.ListenConfig{} }
