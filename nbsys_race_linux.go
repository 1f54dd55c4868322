//go:build linux && race

package defuss

import (
	"runtime"
	"unsafe"
)

// The race detector's view of nbsys_linux.go's reads and writes, as
// syscall's Read and Write give it theirs: the kernel wrote the n bytes
// a read returned, and read the n bytes a write took; and, through
// rawIOSync, a write happens before the read that takes its bytes, for
// data passed between goroutines over a socket.

var rawIOSync int64

func raceRead(b []byte, n int, err error) {
	if n > 0 {
		runtime.RaceWriteRange(unsafe.Pointer(&b[0]), n)
	}
	if err == nil {
		runtime.RaceAcquire(unsafe.Pointer(&rawIOSync))
	}
}

func raceBeforeWrite() { runtime.RaceReleaseMerge(unsafe.Pointer(&rawIOSync)) }

func raceWrote(b []byte, n int) {
	if n > 0 {
		runtime.RaceReadRange(unsafe.Pointer(&b[0]), n)
	}
}
