package defuss

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Issue 4, point 2: the secret appears in no log line, no metric, and in
// the environment or command line of no process.
func TestSecretNeverLeaks(t *testing.T) {
	var logs syncBuffer
	m, opt := newMetrics(t)
	s := startTest(t, opt, WithLogger(slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))))
	for range 4 {
		get(t, s.Addr().String(), "/")
	}
	syscall.Kill(s.Workers()[1].PID, syscall.SIGKILL) // a respawn logs a lot
	waitWorkers(t, s, 5*time.Second, "respawn", func(ws []WorkerInfo) bool { return ws[1].Healthy && ws[1].Restarts == 1 })
	secret := s.p.secret[:]
	forms := map[string][]byte{
		"raw":    secret,
		"hex":    []byte(hex.EncodeToString(secret)),
		"base64": []byte(base64.StdEncoding.EncodeToString(secret)),
		"%v":     []byte(strings.Trim(fmt.Sprint(secret), "[]")),
	}
	places := map[string][]byte{
		"primary log": logs.Bytes(),
		"metrics":     []byte(fmt.Sprintf("%+v", m.collect())),
	}
	pids := []int{os.Getpid()}
	for _, w := range s.Workers() {
		pids = append(pids, w.PID)
	}
	for _, pid := range pids {
		for _, f := range []string{"environ", "cmdline"} {
			b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/" + f)
			if err != nil {
				t.Fatal(err)
			}
			places[fmt.Sprintf("%s of pid %d", f, pid)] = b
		}
	}
	if len(places["primary log"]) == 0 {
		t.Fatal("no log captured")
	}
	for where, b := range places {
		for form, sec := range forms {
			if bytes.Contains(b, sec) {
				t.Errorf("the secret (%s) appears in the %s", form, where)
			}
		}
	}
}
