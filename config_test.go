package defuss

import (
	"crypto/tls"
	"errors"
	"log/slog"
	"math"
	"net"
	"net/http"
	"os"
	"reflect"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// fakeEnv is a getenv over a fixed map, so that the tests do not depend on
// the environment they run in.
func fakeEnv(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

// fakeListener is a net.Listener that is never listened on; newConfig
// only asks it for its address.
type fakeListener struct{ addr net.Addr }

var _ net.Listener = fakeListener{}

func (fakeListener) Accept() (net.Conn, error) { return nil, net.ErrClosed }
func (fakeListener) Close() error              { return nil }
func (l fakeListener) Addr() net.Addr          { return l.addr }

func fakeListenerOn(port int) fakeListener {
	return fakeListener{addr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port}}
}

// isRoundRobin reports whether b hands three candidates out in turn.
func isRoundRobin(b Balancer) bool {
	cands := []WorkerInfo{{Index: 0}, {Index: 1}, {Index: 2}}
	for i := range 6 {
		if w := b(&Request{}, cands); w != &cands[i%3] {
			return false
		}
	}
	return true
}

func TestConfigDefaults(t *testing.T) {
	c, err := newConfig(fakeEnv(nil))
	if err != nil {
		t.Fatalf("newConfig: %v", err)
	}
	checks := []struct {
		name      string
		got, want any
	}{
		{"addr", c.addr, DefaultAddr},
		{"listener", c.listener, net.Listener(nil)},
		{"workers", c.workers, runtime.GOMAXPROCS(0)},
		{"workerHost", c.workerHost, DefaultWorkerHost},
		{"baseWorkerPort", c.baseWorkerPort, 0},
		{"inspectionTimeout", c.inspectionTimeout, DefaultInspectionTimeout},
		{"maxHeaderBytes", c.maxHeaderBytes, DefaultMaxHeaderBytes},
		{"halfOpen", c.halfOpen, true},
		{"heartbeat", c.heartbeat, time.Second},
		{"staleAfter", c.staleAfter, 5 * time.Second},
		{"shutdownTimeout", c.shutdownTimeout, DefaultShutdownTimeout},
		{"startTimeout", c.startTimeout, DefaultStartTimeout},
		{"dialTimeout", c.dialTimeout, defaultDialTimeout},
		{"respawn", c.respawn, true},
		{"signals", c.signals, true},
		{"logger", c.logger, slog.Default()},
		{"workerEnv", len(c.workerEnv), 0},
	}
	for _, ch := range checks {
		if ch.got != ch.want {
			t.Errorf("default %s = %v, want %v", ch.name, ch.got, ch.want)
		}
	}
	if c.balancer == nil || !isRoundRobin(c.balancer) {
		t.Errorf("default balancer is not RoundRobin")
	}
	if DefaultAddr != ":3000" || DefaultHeartbeatInterval != time.Second || DefaultHeartbeatStale != 5*time.Second {
		t.Errorf("documented defaults changed: addr %q, heartbeat %v/%v", DefaultAddr, DefaultHeartbeatInterval, DefaultHeartbeatStale)
	}
}

// TestConfigEnvAddr checks how PORT, LISTEN_PORT and LISTEN_HOST shape the
// default address, and that HOST is ignored.
func TestConfigEnvAddr(t *testing.T) {
	tests := []struct {
		name string
		env  map[string]string
		opts []Option
		want string
	}{
		{name: "no variables", want: ":3000"},
		{name: "PORT", env: map[string]string{"PORT": "8080"}, want: ":8080"},
		{name: "LISTEN_PORT", env: map[string]string{"LISTEN_PORT": "8081"}, want: ":8081"},
		{name: "PORT wins over LISTEN_PORT", env: map[string]string{"PORT": "8080", "LISTEN_PORT": "8081"}, want: ":8080"},
		{name: "empty PORT is unset", env: map[string]string{"PORT": "", "LISTEN_PORT": "8081"}, want: ":8081"},
		{name: "LISTEN_HOST", env: map[string]string{"LISTEN_HOST": "127.0.0.1"}, want: "127.0.0.1:3000"},
		{name: "LISTEN_HOST IPv6 with PORT", env: map[string]string{"LISTEN_HOST": "::1", "PORT": "9000"}, want: "[::1]:9000"},
		{name: "HOST is ignored", env: map[string]string{"HOST": "build-box-7"}, want: ":3000"},
		{name: "HOST is ignored beside LISTEN_HOST", env: map[string]string{"HOST": "build-box-7", "LISTEN_HOST": "127.0.0.1"}, want: "127.0.0.1:3000"},
		{name: "WithAddr wins over the variables", env: map[string]string{"PORT": "8080", "LISTEN_HOST": "127.0.0.1"},
			opts: []Option{WithAddr("[::1]:0")}, want: "[::1]:0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := newConfig(fakeEnv(tt.env), tt.opts...)
			if err != nil {
				t.Fatalf("newConfig: %v", err)
			}
			if c.addr != tt.want {
				t.Errorf("addr = %q, want %q", c.addr, tt.want)
			}
		})
	}
}

// TestConfigNilOptions checks that a nil Option and nil arguments to the
// With* functions that take one keep the defaults.
func TestConfigNilOptions(t *testing.T) {
	c, err := newConfig(fakeEnv(nil), nil, WithListener(nil), WithBalancer(nil), WithLogger(nil), nil)
	if err != nil {
		t.Fatalf("newConfig: %v", err)
	}
	if c.listener != nil {
		t.Errorf("listener = %v, want nil", c.listener)
	}
	if c.addr != DefaultAddr {
		t.Errorf("addr = %q, want %q", c.addr, DefaultAddr)
	}
	if c.logger != slog.Default() {
		t.Errorf("logger is not slog.Default()")
	}
	if c.balancer == nil || !isRoundRobin(c.balancer) {
		t.Errorf("balancer is not the default RoundRobin")
	}

	// A nil argument does not undo an earlier non-nil one either.
	l := fakeListenerOn(4000)
	log := slog.New(slog.DiscardHandler)
	c, err = newConfig(fakeEnv(nil), WithListener(l), WithLogger(log), WithListener(nil), WithLogger(nil))
	if err != nil {
		t.Fatalf("newConfig: %v", err)
	}
	if c.listener != l || c.logger != log {
		t.Errorf("a nil argument replaced an earlier option: listener %v, logger %p", c.listener, c.logger)
	}
}

// ownPID is LISTEN_PID naming this process; parentPID is its parent's.
var ownPID, parentPID = strconv.Itoa(os.Getpid()), strconv.Itoa(os.Getppid())

// The new primary of an Upgrade gets this process's environment without
// what passed descriptors to this one, its predecessor's pid, and whether
// the socket is systemd's.
func TestSuccessorEnv(t *testing.T) {
	t.Setenv(envListenPID, "1")
	t.Setenv(envUpgradeActivated, "1") // this process's own: not passed on as it is
	t.Setenv("DEFUSS_TEST_KEPT", "yes")
	for _, activated := range []bool{false, true} {
		env := successorEnv(activated)
		has := func(kv string) bool { return slices.Contains(env, kv) }
		if !has("DEFUSS_TEST_KEPT=yes") || !has(envUpgradeFrom+"="+ownPID) {
			t.Errorf("activated %v: the environment lacks the user's variable or %s", activated, envUpgradeFrom)
		}
		if has(envListenPID + "=1") {
			t.Errorf("activated %v: %s passed on", activated, envListenPID)
		}
		if got := has(envUpgradeActivated + "=1"); got != activated {
			t.Errorf("activated %v: %s=1 passed: %v", activated, envUpgradeActivated, got)
		}
	}
}

// Socket activation and Upgrade pick the inherited descriptor from the
// environment; LISTEN_* for another process, or none, bind the address.
func TestConfigInheritedSocket(t *testing.T) {
	tests := []struct {
		name string
		env  map[string]string
		opts []Option
		want *passedSocket
	}{
		{name: "none", want: nil},
		{name: "LISTEN_PID of another process", env: map[string]string{"LISTEN_PID": "1", "LISTEN_FDS": "1"}, want: nil},
		{name: "one socket", env: map[string]string{"LISTEN_PID": ownPID, "LISTEN_FDS": "1"},
			want: &passedSocket{fd: 3, from: "systemd socket activation", activated: true}},
		{name: "chosen by name", env: map[string]string{"LISTEN_PID": ownPID, "LISTEN_FDS": "3", "LISTEN_FDNAMES": "a:web:b"},
			opts: []Option{WithActivatedSocket("web")}, want: &passedSocket{fd: 4, from: "systemd socket activation", activated: true}},
		{name: "name without activation binds the address", opts: []Option{WithActivatedSocket("web")}, want: nil},
		{name: "WithListener wins over activation", env: map[string]string{"LISTEN_PID": ownPID, "LISTEN_FDS": "1"},
			opts: []Option{WithListener(fakeListenerOn(40001))}, want: nil},
		{name: "upgrade", env: map[string]string{envUpgradeFrom: parentPID, "LISTEN_PID": ownPID, "LISTEN_FDS": "2"},
			want: &passedSocket{fd: 3, from: "upgrade from pid " + parentPID}},
		{name: "upgrade of systemd's socket", env: map[string]string{envUpgradeFrom: parentPID, envUpgradeActivated: "1"},
			want: &passedSocket{fd: 3, from: "upgrade from pid " + parentPID, activated: true}},
		// A child of the new primary inherits the variable: not its own.
		{name: "upgrade variable naming another parent", env: map[string]string{envUpgradeFrom: "1"}, want: nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := newConfig(func(k string) string { return tt.env[k] }, tt.opts...)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(c.inherited, tt.want) {
				t.Errorf("inherited %+v, want %+v", c.inherited, tt.want)
			}
		})
	}
}

func TestConfigValidOptions(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	l := fakeListenerOn(40001)
	tests := []struct {
		name  string
		env   map[string]string
		opts  []Option
		check func(c *config) bool
	}{
		{"WithAddr", nil, []Option{WithAddr("127.0.0.1:0")}, func(c *config) bool { return c.addr == "127.0.0.1:0" }},
		{"WithListener ignores WithAddr", nil, []Option{WithAddr("not an address"), WithListener(l)},
			func(c *config) bool { return c.listener == l }},
		{"WithWorkers", nil, []Option{WithWorkers(3)}, func(c *config) bool { return c.workers == 3 }},
		{"WithWorkers(0) means GOMAXPROCS", nil, []Option{WithWorkers(0)}, func(c *config) bool { return c.workers == runtime.GOMAXPROCS(0) }},
		{"WithWorkers at the maximum", nil, []Option{WithWorkers(1024)}, func(c *config) bool { return c.workers == 1024 }},
		{"WithWorkerHost IPv6 loopback", nil, []Option{WithWorkerHost("::1")}, func(c *config) bool { return c.workerHost == "::1" }},
		// Issue 11, point 13: a name could resolve to another family in the
		// worker than in the primary; "localhost" is taken as 127.0.0.1.
		{"WithWorkerHost localhost", nil, []Option{WithWorkerHost("localhost")}, func(c *config) bool { return c.workerHost == "127.0.0.1" }},
		{"WithWorkerHost ::1", nil, []Option{WithWorkerHost("::1")}, func(c *config) bool { return c.workerHost == "::1" }},
		// Issue 12: srv.Addr is the public address unless WithAddr says
		// otherwise, and wins over PORT.
		{"WithServer Addr", nil, []Option{WithServer(&http.Server{Addr: "127.0.0.1:8123"})}, func(c *config) bool { return c.addr == "127.0.0.1:8123" }},
		{"WithAddr beats WithServer Addr", nil, []Option{WithAddr(":9000"), WithServer(&http.Server{Addr: "127.0.0.1:8123"})}, func(c *config) bool { return c.addr == ":9000" }},
		{"WithServer Addr beats PORT", map[string]string{"PORT": "7000"}, []Option{WithServer(&http.Server{Addr: ":8123"})}, func(c *config) bool { return c.addr == ":8123" }},
		{"WithServer without Addr keeps PORT", map[string]string{"PORT": "7000"}, []Option{WithServer(&http.Server{})}, func(c *config) bool { return c.addr == ":7000" }},
		// Issue 11, point 11: the largest values that are still accepted.
		{"WithMaxRequests at the int64 limit", nil, []Option{WithMaxRequests(math.MaxInt-10, 10)}, func(c *config) bool { return c.maxRequests == math.MaxInt-10 && c.maxRequestsJitter == 10 }},
		{"durations of a day", nil, []Option{WithHeartbeat(maxDuration/2, maxDuration), WithShutdownTimeout(maxDuration), WithStartTimeout(maxDuration),
			WithDrainDelay(maxDuration), WithInspectionTimeout(maxDuration)}, func(c *config) bool { return c.staleAfter == maxDuration && c.shutdownTimeout == maxDuration }},
		{"WithWorkerHost other 127/8 address", nil, []Option{WithWorkerHost("127.0.0.2")}, func(c *config) bool { return c.workerHost == "127.0.0.2" }},
		{"WithBaseWorkerPort", nil, []Option{WithWorkers(4), WithBaseWorkerPort(40000)}, func(c *config) bool { return c.baseWorkerPort == 40000 }},
		{"WithBaseWorkerPort just below the public port", nil, []Option{WithAddr(":40004"), WithWorkers(4), WithBaseWorkerPort(40000)},
			func(c *config) bool { return c.baseWorkerPort == 40000 }},
		{"WithBaseWorkerPort with an ephemeral public port", nil, []Option{WithAddr("127.0.0.1:0"), WithWorkers(4), WithBaseWorkerPort(1)},
			func(c *config) bool { return c.baseWorkerPort == 1 }},
		{"WithBaseWorkerPort ending at 65535", nil, []Option{WithWorkers(2), WithBaseWorkerPort(65534)},
			func(c *config) bool { return c.baseWorkerPort == 65534 }},
		{"WithInspectionTimeout", nil, []Option{WithInspectionTimeout(time.Millisecond)}, func(c *config) bool { return c.inspectionTimeout == time.Millisecond }},
		{"WithMaxHeaderBytes minimum", nil, []Option{WithMaxHeaderBytes(64)}, func(c *config) bool { return c.maxHeaderBytes == 64 }},
		{"WithMaxHeaderBytes maximum", nil, []Option{WithMaxHeaderBytes(1 << 20)}, func(c *config) bool { return c.maxHeaderBytes == 1<<20 }},
		{"WithHalfOpen(false)", nil, []Option{WithHalfOpen(false)}, func(c *config) bool { return !c.halfOpen }},
		{"WithHeartbeat", nil, []Option{WithHeartbeat(50*time.Millisecond, 500*time.Millisecond)},
			func(c *config) bool {
				return c.heartbeat == 50*time.Millisecond && c.staleAfter == 500*time.Millisecond
			}},
		{"WithHeartbeat at the minimum", nil, []Option{WithHeartbeat(time.Millisecond, time.Millisecond+1)},
			func(c *config) bool { return c.heartbeat == time.Millisecond }},
		{"WithShutdownTimeout", nil, []Option{WithShutdownTimeout(time.Minute)}, func(c *config) bool { return c.shutdownTimeout == time.Minute }},
		{"WithStartTimeout", nil, []Option{WithStartTimeout(time.Minute)}, func(c *config) bool { return c.startTimeout == time.Minute }},
		{"WithRespawn(false)", nil, []Option{WithRespawn(false)}, func(c *config) bool { return !c.respawn }},
		{"WithSignalHandling(false)", nil, []Option{WithSignalHandling(false)}, func(c *config) bool { return !c.signals }},
		{"WithLogger", nil, []Option{WithLogger(log)}, func(c *config) bool { return c.logger == log }},
		{"WithBalancer", nil, []Option{WithBalancer(LeastConnections())}, func(c *config) bool { return c.balancer != nil && !isRoundRobin(c.balancer) }},
		{"WithWorkerEnv accumulates", nil, []Option{WithWorkerEnv("A=1", "B="), WithWorkerEnv("C=x=y")},
			func(c *config) bool { return slices.Equal(c.workerEnv, []string{"A=1", "B=", "C=x=y"}) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := newConfig(fakeEnv(tt.env), tt.opts...)
			if err != nil {
				t.Fatalf("newConfig: %v", err)
			}
			if !tt.check(c) {
				t.Errorf("option not applied: %+v", c)
			}
		})
	}
}

// TestConfigInvalidOptions checks that every bad setting is reported as
// ErrInvalidOption, by the name of the option (or variable) to fix.
func TestConfigInvalidOptions(t *testing.T) {
	tests := []struct {
		name string
		env  map[string]string
		opts []Option
		want []string // substrings of the message
	}{
		{name: "negative workers", opts: []Option{WithWorkers(-1)}, want: []string{"WithWorkers"}},
		{name: "too many workers", opts: []Option{WithWorkers(1025)}, want: []string{"WithWorkers"}},

		{name: "stale equal to interval", opts: []Option{WithHeartbeat(time.Second, time.Second)}, want: []string{"WithHeartbeat"}},
		{name: "stale below interval", opts: []Option{WithHeartbeat(time.Second, time.Millisecond)}, want: []string{"WithHeartbeat"}},
		{name: "zero interval", opts: []Option{WithHeartbeat(0, time.Second)}, want: []string{"WithHeartbeat"}},
		{name: "interval below 1ms", opts: []Option{WithHeartbeat(time.Microsecond, time.Second)}, want: []string{"WithHeartbeat"}},
		{name: "negative interval", opts: []Option{WithHeartbeat(-time.Second, time.Second)}, want: []string{"WithHeartbeat"}},

		{name: "worker ports collide with the public port", opts: []Option{WithAddr(":40001"), WithWorkers(4), WithBaseWorkerPort(40000)},
			want: []string{"WithBaseWorkerPort"}},
		{name: "first worker port is the public port", opts: []Option{WithAddr("127.0.0.1:40000"), WithWorkers(1), WithBaseWorkerPort(40000)},
			want: []string{"WithBaseWorkerPort"}},
		{name: "worker ports collide with PORT", env: map[string]string{"PORT": "40003"}, opts: []Option{WithWorkers(4), WithBaseWorkerPort(40000)},
			want: []string{"WithBaseWorkerPort"}},
		{name: "worker ports collide with the listener's port", opts: []Option{WithListener(fakeListenerOn(40002)), WithWorkers(4), WithBaseWorkerPort(40000)},
			want: []string{"WithBaseWorkerPort"}},
		{name: "worker ports beyond 65535", opts: []Option{WithWorkers(2), WithBaseWorkerPort(65535)}, want: []string{"WithBaseWorkerPort"}},
		{name: "base worker port beyond 65535", opts: []Option{WithWorkers(1), WithBaseWorkerPort(65536)}, want: []string{"WithBaseWorkerPort"}},
		{name: "negative base worker port", opts: []Option{WithBaseWorkerPort(-1)}, want: []string{"WithBaseWorkerPort"}},
		// base+workers-1 overflows int and wraps negative, which slips
		// past validate's "> 65535" check; the primary would then tell
		// worker i to listen on uint16(base+i) and reject the port it
		// reports, instead of Start returning ErrInvalidOption.
		{name: "base worker port overflowing int", opts: []Option{WithWorkers(2), WithBaseWorkerPort(math.MaxInt)}, want: []string{"WithBaseWorkerPort"}},

		{name: "worker host unspecified address", opts: []Option{WithWorkerHost("0.0.0.0")}, want: []string{"WithWorkerHost"}},
		{name: "worker host IPv6 unspecified address", opts: []Option{WithWorkerHost("::")}, want: []string{"WithWorkerHost"}},
		{name: "worker host private address", opts: []Option{WithWorkerHost("192.168.1.10")}, want: []string{"WithWorkerHost"}},
		{name: "worker host name", opts: []Option{WithWorkerHost("example.com")}, want: []string{"WithWorkerHost"}},
		{name: "worker host empty", opts: []Option{WithWorkerHost("")}, want: []string{"WithWorkerHost"}},

		{name: "worker env without =", opts: []Option{WithWorkerEnv("GOGC")}, want: []string{"WithWorkerEnv", `"GOGC"`}},
		{name: "worker env without key", opts: []Option{WithWorkerEnv("=1")}, want: []string{"WithWorkerEnv"}},
		{name: "worker env good and bad", opts: []Option{WithWorkerEnv("A=1", "", "B=2")}, want: []string{"WithWorkerEnv"}},

		{name: "zero inspection timeout", opts: []Option{WithInspectionTimeout(0)}, want: []string{"WithInspectionTimeout"}},
		{name: "negative inspection timeout", opts: []Option{WithInspectionTimeout(-time.Millisecond)}, want: []string{"WithInspectionTimeout"}},
		{name: "zero shutdown timeout", opts: []Option{WithShutdownTimeout(0)}, want: []string{"WithShutdownTimeout"}},
		{name: "negative shutdown timeout", opts: []Option{WithShutdownTimeout(-time.Second)}, want: []string{"WithShutdownTimeout"}},
		{name: "zero start timeout", opts: []Option{WithStartTimeout(0)}, want: []string{"WithStartTimeout"}},
		{name: "negative start timeout", opts: []Option{WithStartTimeout(-time.Second)}, want: []string{"WithStartTimeout"}},

		{name: "header cap below 64", opts: []Option{WithMaxHeaderBytes(63)}, want: []string{"WithMaxHeaderBytes"}},
		{name: "header cap over 1 MiB", opts: []Option{WithMaxHeaderBytes(1<<20 + 1)}, want: []string{"WithMaxHeaderBytes"}},

		{name: "addr without port", opts: []Option{WithAddr("localhost")}, want: []string{"WithAddr", `"localhost"`}},
		{name: "addr empty", opts: []Option{WithAddr("")}, want: []string{"WithAddr"}},
		{name: "addr port out of range", opts: []Option{WithAddr("127.0.0.1:65536")}, want: []string{"WithAddr"}},
		{name: "addr negative port", opts: []Option{WithAddr(":-1")}, want: []string{"WithAddr"}},
		{name: "addr port not a number", opts: []Option{WithAddr(":eighty")}, want: []string{"WithAddr"}},
		{name: "PORT not a number", env: map[string]string{"PORT": "eighty"}, want: []string{"PORT"}},
		{name: "LISTEN_PORT out of range", env: map[string]string{"LISTEN_PORT": "70000"}, want: []string{"LISTEN_PORT"}},

		// Issue 11, point 11: values whose arithmetic overflowed. A jitter
		// of MaxInt panicked a supervisor; a stale time of MaxInt64 made
		// 2×staleAfter negative and killed every worker; a shutdown timeout
		// near MaxInt64 overflowed the primary's deadline.
		{name: "requests plus jitter overflow", opts: []Option{WithMaxRequests(1, math.MaxInt)}, want: []string{"WithMaxRequests"}},
		{name: "requests plus jitter overflow by one", opts: []Option{WithMaxRequests(math.MaxInt-9, 10)}, want: []string{"WithMaxRequests"}},
		{name: "stale time of MaxInt64", opts: []Option{WithHeartbeat(time.Second, math.MaxInt64)}, want: []string{"WithHeartbeat"}},
		{name: "heartbeat over a day", opts: []Option{WithHeartbeat(maxDuration+1, 2*maxDuration)}, want: []string{"WithHeartbeat"}},
		{name: "shutdown timeout of MaxInt64", opts: []Option{WithShutdownTimeout(math.MaxInt64)}, want: []string{"WithShutdownTimeout"}},
		{name: "start timeout over a day", opts: []Option{WithStartTimeout(maxDuration + 1)}, want: []string{"WithStartTimeout"}},

		{name: "empty PID file path", opts: []Option{WithPIDFile("")}, want: []string{"WithPIDFile"}},
		{name: "empty socket name", opts: []Option{WithActivatedSocket("")}, want: []string{"WithActivatedSocket"}},
		{name: "socket name with a colon", opts: []Option{WithActivatedSocket("a:b")}, want: []string{"WithActivatedSocket"}},
		{name: "LISTEN_FDS not a number", env: map[string]string{"LISTEN_PID": ownPID, "LISTEN_FDS": "x"}, want: []string{"LISTEN_FDS", `"x"`}},
		{name: "LISTEN_FDS zero", env: map[string]string{"LISTEN_PID": ownPID, "LISTEN_FDS": "0"}, want: []string{"LISTEN_FDS"}},
		{name: "LISTEN_FDS huge", env: map[string]string{"LISTEN_PID": ownPID, "LISTEN_FDS": "99999999999999999999"}, want: []string{"LISTEN_FDS"}},
		{name: "two activated sockets, no name", env: map[string]string{"LISTEN_PID": ownPID, "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"},
			want: []string{"2 sockets", "WithActivatedSocket"}},
		{name: "activated socket name not passed", env: map[string]string{"LISTEN_PID": ownPID, "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"},
			opts: []Option{WithActivatedSocket("c")}, want: []string{`WithActivatedSocket("c")`, "no socket of that name"}},
		{name: "activated socket name beyond LISTEN_FDS", env: map[string]string{"LISTEN_PID": ownPID, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"},
			opts: []Option{WithActivatedSocket("b")}, want: []string{`WithActivatedSocket("b")`}},
		{name: "upgrade from a bad pid", env: map[string]string{envUpgradeFrom: "-3"}, want: []string{envUpgradeFrom}},
		{name: "drain delay of MaxInt64", opts: []Option{WithDrainDelay(math.MaxInt64)}, want: []string{"WithDrainDelay"}},
		{name: "inspection timeout over a day", opts: []Option{WithInspectionTimeout(maxDuration + 1)}, want: []string{"WithInspectionTimeout"}},

		// Issue 12: a TLS listener would hide the ClientHello from the
		// primary and take TLS from the workers; point to WithServer.
		{name: "TLS listener", opts: []Option{WithListener(tls.NewListener(fakeListenerOn(40000), &tls.Config{}))}, want: []string{"WithListener", "WithServer"}},
		// Issue 12: a TLSConfig without a certificate cannot serve HTTPS.
		{name: "server with TLSConfig without certificate", opts: []Option{WithServer(&http.Server{TLSConfig: &tls.Config{}})}, want: []string{"WithServer", "TLSConfig"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := newConfig(fakeEnv(tt.env), tt.opts...)
			if !errors.Is(err, ErrInvalidOption) {
				t.Fatalf("newConfig error = %v, want one wrapping ErrInvalidOption", err)
			}
			if c != nil {
				t.Errorf("newConfig returned a config with the error %v", err)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not name %s", err, w)
				}
			}
			if !strings.HasPrefix(err.Error(), "defuss: ") {
				t.Errorf("error %q does not start with \"defuss: \"", err)
			}
		})
	}
}

// TestConfigReportsEveryBadOption checks that validation reports all the
// bad options at once, not just the first.
func TestConfigReportsEveryBadOption(t *testing.T) {
	_, err := newConfig(fakeEnv(nil),
		WithWorkers(-1),
		WithHeartbeat(time.Second, time.Second),
		WithWorkerEnv("NOPE"),
		WithAddr("nowhere"),
		WithStartTimeout(0),
	)
	if !errors.Is(err, ErrInvalidOption) {
		t.Fatalf("newConfig error = %v, want one wrapping ErrInvalidOption", err)
	}
	for _, name := range []string{"WithWorkers", "WithHeartbeat", "WithWorkerEnv", "WithAddr", "WithStartTimeout"} {
		if !strings.Contains(err.Error(), name) {
			t.Errorf("error %q does not name %s", err, name)
		}
	}
	var joined interface{ Unwrap() []error }
	if !errors.As(err, &joined) {
		t.Fatalf("error %v joins no errors", err)
	}
	if errs := joined.Unwrap(); len(errs) != 5 {
		t.Errorf("error joins %d errors, want 5: %v", len(errs), errs)
	}
	for _, e := range joined.Unwrap() {
		if !errors.Is(e, ErrInvalidOption) {
			t.Errorf("joined error %v does not wrap ErrInvalidOption", e)
		}
	}
}
