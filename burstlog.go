package defuss

import (
	"sync"
	"time"
)

// burstLog rate-limits one kind of log line: at most one per interval, so
// a failure that repeats per connection never floods the log.
type burstLog struct {
	mu         sync.Mutex
	next       time.Time
	suppressed int
}

const burstInterval = time.Second

// allow reports whether a line may be logged now, and how many were
// suppressed since the last one that was.
func (b *burstLog) allow() (ok bool, suppressed int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := time.Now()
	if now.Before(b.next) {
		b.suppressed++
		return false, 0
	}
	b.next = now.Add(burstInterval)
	suppressed, b.suppressed = b.suppressed, 0
	return true, suppressed
}
