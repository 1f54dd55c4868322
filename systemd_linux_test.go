package defuss

// Issue 13: systemd. Socket activation with the real systemd-socket-activate,
// and sd_notify into a real AF_UNIX datagram socket.

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// socketActivate returns the path of systemd-socket-activate, or skips
// the test where it is missing (outside CI: .ci/run installs it).
func socketActivate(t *testing.T) string {
	t.Helper()
	path, err := exec.LookPath("systemd-socket-activate")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("systemd-socket-activate is not installed; .ci/run installs it (Debian's systemd)")
		}
		t.Skip("systemd-socket-activate not installed (apt-get install systemd)")
	}
	return path
}

// activateCmd is systemd-socket-activate listening on addrs, with names,
// set to run app as a test primary with n workers. systemd-socket-activate
// passes no environment of its own: what the primary needs is given with
// -E.
func activateCmd(t *testing.T, app string, n int, names string, opts string, addrs ...string) *exec.Cmd {
	args := []string{"--fdname=" + names}
	for _, a := range addrs {
		args = append(args, "-l", a)
	}
	env := []string{envTestPrimary + "=" + strconv.Itoa(n), "GORACE=atexit_sleep_ms=0", envTestPrimaryOpts + "=" + opts}
	if handoffMode {
		env = append(env, "DEFUSS_TEST_HANDOFF=1")
	}
	for _, kv := range env {
		args = append(args, "-E", kv)
	}
	return exec.Command(socketActivate(t), append(args, app, "-test.run=^$")...)
}

// dialActivated connects to addr once systemd-socket-activate listens
// there (it is starting), within 10s.
func dialActivated(addr string) (net.Conn, error) {
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, 10*time.Second)
		if err == nil || !errors.Is(err, syscall.ECONNREFUSED) || time.Now().After(deadline) {
			return c, err
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Issue 13: socket activation by the real systemd-socket-activate. The
// first connection, which started the server, is served; the primary
// serves on the socket systemd chose by name among two, and its workers
// see none of LISTEN_*; an upgrade passes the activated socket on. The
// activated socket limits unsent data (TCP_NOTSENT_LOWAT), on the first
// connection, which waited in its accept queue until the primary was
// ready, and on connections before the upgrade and after it.
func TestSocketActivation(t *testing.T) {
	socketActivate(t) // where it is missing, skip before anything starts
	app := filepath.Join(t.TempDir(), "app")
	copyBinary(t, app, "")
	a := "127.0.0.1:" + strconv.Itoa(freePort(t))
	b := "127.0.0.1:" + strconv.Itoa(freePort(t))
	// The first connection asks for a download it does not read. It
	// starts the server and waits in the socket's accept queue until the
	// primary is ready, which cannot accept before then.
	type dialed struct {
		c   net.Conn
		err error
	}
	queued := make(chan dialed, 1)
	go func() {
		c, err := dialActivated(b)
		if err == nil {
			_, err = io.WriteString(c, "GET /download?n=33554432 HTTP/1.1\r\nHost: test\r\n\r\n")
		}
		queued <- dialed{c, err}
	}()
	var first dialed
	taken := false
	closeFirst := func() {
		if !taken {
			first, taken = <-queued, true
		}
		if first.c != nil {
			first.c.Close()
		}
	}
	t.Cleanup(closeFirst) // if the test ends before the check below
	p := startPrimaryCmd(t, activateCmd(t, app, 2, "admin:web", "socket=web", a, b), 2, nil)
	if p.addr != b {
		t.Errorf("primary serves on %s, want the socket named web, %s", p.addr, b)
	}
	first, taken = <-queued, true
	if first.err != nil {
		t.Fatalf("the connection that started the server: %v", first.err)
	}
	ba, err := net.ResolveTCPAddr("tcp", b)
	if err != nil {
		t.Fatal(err)
	}
	checkUnsent := systemUnsentLimit() > unsentLimit
	if checkUnsent {
		t.Logf("the first connection's socket held at most %d bytes", watchUnsent(t, ba, first.c))
	}
	first.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if resp, err := http.ReadResponse(bufio.NewReader(first.c), nil); err != nil || resp.StatusCode != 200 || resp.ContentLength != 32<<20 {
		t.Errorf("the connection that started the server: %v, %v; want it served", resp, err)
	}
	closeFirst()
	for _, k := range []string{"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET", envUpgradeFrom} {
		if _, got := get(t, b, "/env?k="+k); got != "false " {
			t.Errorf("worker sees %s: %q", k, got)
		}
	}
	// Connections after the start get TCP_NOTSENT_LOWAT from the
	// listener, and after the upgrade too (unsentQueued fails the test
	// if a connection's unsent data is not limited).
	if checkUnsent {
		unsentQueued(t, ba)
	}

	// The activated socket survives an upgrade.
	if err := p.cmd.Process.Signal(syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	newPID, addr, workers := successorOf(t, p, "")
	if err := p.wait(); err != nil {
		t.Errorf("old primary: %v", err)
	}
	if addr != b || newPID == p.cmd.Process.Pid {
		t.Errorf("after the upgrade: primary %d on %s", newPID, addr)
	}
	if _, got := get(t, b, "/pid"); !containsPID(workers, got) {
		t.Errorf("after the upgrade, served by %s, not by the new workers %v", got, workers)
	}
	if checkUnsent {
		unsentQueued(t, ba)
	}
}

func containsPID(pids []int, s string) bool {
	n, err := strconv.Atoi(strings.TrimSpace(s))
	for _, p := range pids {
		if err == nil && p == n {
			return true
		}
	}
	return false
}

// Issue 13: bad socket activation is a clear error at Start: several
// sockets and no name to choose one, or a name systemd did not pass.
func TestSocketActivationErrors(t *testing.T) {
	app := filepath.Join(t.TempDir(), "app")
	copyBinary(t, app, "")
	for _, tc := range []struct{ opts, want string }{
		{"", "systemd passed 2 sockets"},
		{"socket=metrics", `WithActivatedSocket("metrics"): systemd passed no socket of that name`},
	} {
		a := "127.0.0.1:" + strconv.Itoa(freePort(t))
		b := "127.0.0.1:" + strconv.Itoa(freePort(t))
		cmd := activateCmd(t, app, 1, "admin:web", tc.opts, a, b)
		var out strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		c, err := dialActivated(a) // starts it
		if err != nil {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatal(err)
		}
		err = cmd.Wait()
		c.Close()
		if err == nil || !strings.Contains(out.String(), tc.want) {
			t.Errorf("opts %q: exit %v, output:\n%s\nwant it to say %q", tc.opts, err, out.String(), tc.want)
		}
	}
}

// notifySocket is a real AF_UNIX datagram socket, as systemd's
// NOTIFY_SOCKET, that receives each sender's pid with its message.
type notifySocket struct {
	path string
	c    *net.UnixConn
}

func newNotifySocket(t *testing.T) *notifySocket {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1) })
	if serr != nil {
		t.Fatal(serr)
	}
	return &notifySocket{path: path, c: c}
}

var monotonic = regexp.MustCompile(`MONOTONIC_USEC=[0-9]+\n`)

// next returns the next message (MONOTONIC_USEC's value replaced by N) and
// its sender's pid, waiting up to timeout; "" when none came.
func (n *notifySocket) next(t *testing.T, timeout time.Duration) (string, int) {
	t.Helper()
	buf, oob := make([]byte, 4096), make([]byte, 1024)
	n.c.SetReadDeadline(time.Now().Add(timeout))
	m, oobn, _, _, err := n.c.ReadMsgUnix(buf, oob)
	if err != nil {
		return "", 0
	}
	pid := 0
	if msgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
		for _, msg := range msgs {
			if cred, err := unix.ParseUnixCredentials(&msg); err == nil {
				pid = int(cred.Pid)
			}
		}
	}
	return monotonic.ReplaceAllString(string(buf[:m]), "MONOTONIC_USEC=N\n"), pid
}

// expect fails unless the next message is want, from pid.
func (n *notifySocket) expect(t *testing.T, want string, pid int) {
	t.Helper()
	got, from := n.next(t, time.Minute)
	if got != want || from != pid {
		t.Fatalf("sd_notify: got %q from pid %d, want %q from pid %d", got, from, want, pid)
	}
}

// Issue 13: sd_notify over a real datagram socket, across start, a rolling
// restart, a failed upgrade, an upgrade and a stop: exactly these messages, in this order,
// each from the process that should send it (the new primary announces
// itself with MAINPID=), and none from a worker.
func TestSDNotify(t *testing.T) {
	ns := newNotifySocket(t)
	app := filepath.Join(t.TempDir(), "app")
	copyBinary(t, app, "")
	p := startPrimaryCmd(t, exec.Command(app, "-test.run=^$"), 2, nil, "NOTIFY_SOCKET="+ns.path)
	old := p.cmd.Process.Pid
	ns.expect(t, "READY=1\nSTATUS=2 of 2 workers ready", old)
	if _, got := get(t, p.addr, "/env?k=NOTIFY_SOCKET"); got != "false " {
		t.Errorf("worker sees NOTIFY_SOCKET: %q", got)
	}

	p.cmd.Process.Signal(syscall.SIGHUP)
	ns.expect(t, "RELOADING=1\nMONOTONIC_USEC=N\nSTATUS=restarting workers", old)
	ns.expect(t, "READY=1\nSTATUS=2 of 2 workers ready", old)

	// A failed upgrade ends the reload with READY=1 and says why.
	if err := os.WriteFile(app+".new", []byte("#!/bin/sh\nexit 3\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(app+".new", app); err != nil {
		t.Fatal(err)
	}
	p.cmd.Process.Signal(syscall.SIGUSR2)
	ns.expect(t, "RELOADING=1\nMONOTONIC_USEC=N\nSTATUS=upgrading: starting a new primary", old)
	got, from := ns.next(t, time.Minute)
	failed := regexp.MustCompile(`^READY=1\nSTATUS=upgrade failed: defuss: worker failed to start: upgrade: new primary \(pid [0-9]+\) ended before it was ready \(exit status 3\)$`)
	if !failed.MatchString(got) || from != old {
		t.Fatalf("sd_notify after a failed upgrade: %q from pid %d", got, from)
	}

	copyBinary(t, app, "v2")
	p.cmd.Process.Signal(syscall.SIGUSR2)
	ns.expect(t, "RELOADING=1\nMONOTONIC_USEC=N\nSTATUS=upgrading: starting a new primary", old)
	newPID, _, _ := successorOf(t, p, "")
	ns.expect(t, "MAINPID="+strconv.Itoa(newPID)+"\nREADY=1\nSTATUS=2 of 2 workers ready", newPID)
	if err := p.wait(); err != nil {
		t.Errorf("old primary: %v", err)
	}

	syscall.Kill(newPID, syscall.SIGTERM)
	ns.expect(t, "STOPPING=1\nSTATUS=shutting down", newPID)
	waitFor(t, 15*time.Second, "the new primary's exit", func() bool { return !alive(newPID) })
	if got, from := ns.next(t, 200*time.Millisecond); got != "" {
		t.Errorf("unexpected message after the stop: %q from pid %d", got, from)
	}
}
