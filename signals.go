package defuss

import (
	"os"
	"os/signal"
	"syscall"
)

func notifySignals(ch chan<- os.Signal, sigs ...os.Signal) { signal.Notify(ch, sigs...) }

func stopSignals(ch chan<- os.Signal) { signal.Stop(ch) }

// catchSIGPIPE keeps a write to a closed stdout or stderr (a log line
// whose reader has gone) from killing the process: while SIGPIPE is
// notified, such a write returns EPIPE instead (see os/signal). The signal
// itself is dropped: nobody reads the channel.
func catchSIGPIPE() chan os.Signal {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGPIPE)
	return ch
}
