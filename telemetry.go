package defuss

import (
	"sync"
	"time"
)

// burstLog rate-limits one kind of log line: at most one per interval, so
// a failure that repeats per connection never floods the log.
type burstLog struct {
	mu   sync.Mutex
	next time.Time
}

const burstInterval = time.Second

// allow reports whether a line may be logged now.
func (b *burstLog) allow() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := time.Now()
	if now.Before(b.next) {
		return false
	}
	b.next = now.Add(burstInterval)
	return true
}
