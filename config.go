package defuss

import (
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"strconv"
	"strings"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/metric"
)

// Defaults of the options. The heartbeat is frequent so that a stuck worker
// is noticed within seconds; a heartbeat frame costs the primary next to
// nothing.
const (
	DefaultAddr              = ":3000"
	DefaultWorkerHost        = "127.0.0.1"
	DefaultInspectionTimeout = 10 * time.Millisecond
	DefaultMaxHeaderBytes    = 16 << 10
	DefaultHeartbeatInterval = 1 * time.Second
	DefaultHeartbeatStale    = 5 * time.Second
	DefaultShutdownTimeout   = 10 * time.Second
	DefaultStartTimeout      = 30 * time.Second
)

// defaultDialTimeout bounds the primary's dial to a worker on loopback.
const defaultDialTimeout = 1 * time.Second

// maxWorkers bounds WithWorkers and Scale.
const maxWorkers = 1024

// maxDuration bounds every duration option, so that the primary's
// arithmetic on them (2×staleAfter, shutdownTimeout plus a grace second)
// cannot overflow. No server waits a day for a worker.
const maxDuration = 24 * time.Hour

// An Option configures [Start]. Options are created by the With* functions.
type Option interface {
	apply(*config)
}

type optionFunc func(*config)

func (f optionFunc) apply(c *config) { f(c) }

// config is resolved once, in newConfig, and read-only afterwards.
type config struct {
	addr              string
	addrSet           bool         // WithAddr was given
	server            *http.Server // WithServer: the user's server, its settings and hooks
	listener          net.Listener
	workers           int
	workerHost        string
	baseWorkerPort    int
	inspectionTimeout time.Duration
	maxHeaderBytes    int
	halfOpen          bool
	heartbeat         time.Duration
	staleAfter        time.Duration
	shutdownTimeout   time.Duration
	startTimeout      time.Duration
	dialTimeout       time.Duration
	respawn           bool
	balancer          Balancer
	logger            *slog.Logger
	workerEnv         []string
	signals           bool
	meterProvider     metric.MeterProvider
	trusted           []netip.Prefix
	healthPath        string
	drainDelay        time.Duration
	maxConns          int
	maxRequests       uint64
	maxRequestsJitter uint64
	maxMemory         uint64
	handoff           bool
	pidFile           string
	socketName        string // WithActivatedSocket
	// inherited is the public socket this process inherits instead of
	// binding (socket activation, or an Upgrade); nil to bind addr.
	inherited *passedSocket

	// onExit, when set (tests only), sees every worker exit.
	onExit func(slot, pid int, err error)
	// executable, when set (tests only), is what workers run instead of
	// os.Executable().
	executable string
	// noWorkerSocket (tests only): a worker binds no worker socket, as
	// an earlier version's.
	noWorkerSocket bool

	// errs collects option errors; validate reports them all at once.
	errs []error
}

// WithAddr sets the public address the primary listens on, in the form
// accepted by [net.Listen] ("host:port"). The default is ":3000"; when the
// option is not given, the environment variables PORT (or LISTEN_PORT) and
// LISTEN_HOST override the default's port and host. HOST is deliberately not
// read: many shells set it to the machine's name.
func WithAddr(addr string) Option {
	return optionFunc(func(c *config) { c.addr, c.addrSet = addr, true })
}

// WithListener makes the primary accept on l instead of listening on an
// address; [WithAddr] is then ignored. The primary closes l when it stops.
// A nil l keeps the default.
func WithListener(l net.Listener) Option {
	return optionFunc(func(c *config) {
		if l == nil {
			return
		}
		if v := reflect.ValueOf(l); v.Kind() == reflect.Pointer && v.IsNil() {
			c.errs = append(c.errs, fmt.Errorf("%w: WithListener: nil %T", ErrInvalidOption, l))
			return
		}
		// crypto/tls's listener type is unexported: its name is the test.
		if reflect.TypeOf(l).String() == "*tls.listener" {
			c.errs = append(c.errs, fmt.Errorf("%w: WithListener: a TLS listener (tls.NewListener): the primary passes TLS through and the workers terminate it; give the plain listener, and the certificates with WithServer(&http.Server{TLSConfig: ...})", ErrInvalidOption))
			return
		}
		c.listener = l
	})
}

// WithPIDFile makes the primary write its pid to path once it serves
// (atomically: a temporary file in the same directory, renamed), and
// remove the file when it stops. On [Server.Upgrade] the new primary
// rewrites it before the old one stops, and the old one leaves it alone,
// so that scripts find the primary that serves (systemd follows
// MAINPID= instead). A relative path is resolved when WithPIDFile is
// called. If the new primary of an upgrade fails after writing it, the old
// one puts its own pid back.
func WithPIDFile(path string) Option {
	return optionFunc(func(c *config) {
		if path == "" {
			c.errs = append(c.errs, fmt.Errorf("%w: WithPIDFile(%q): empty path", ErrInvalidOption, path))
			return
		}
		abs, err := filepath.Abs(path)
		if err != nil {
			c.errs = append(c.errs, fmt.Errorf("%w: WithPIDFile(%q): %v", ErrInvalidOption, path, err))
			return
		}
		c.pidFile = abs
	})
}

// WithActivatedSocket chooses, under systemd socket activation, which of
// the sockets systemd passes the primary serves: the one named name
// (FileDescriptorName= in the .socket unit, LISTEN_FDNAMES). It is needed
// only when the unit passes more than one socket. Without socket
// activation the option does nothing, so the same binary also runs by hand
// on its WithAddr address.
func WithActivatedSocket(name string) Option {
	return optionFunc(func(c *config) {
		if name == "" || strings.ContainsAny(name, ":\x00") {
			c.errs = append(c.errs, fmt.Errorf("%w: WithActivatedSocket(%q): a socket name is not empty and has no ':'", ErrInvalidOption, name))
			return
		}
		c.socketName = name
	})
}

// WithWorkers sets the number of worker processes. Zero, the default, means
// one per CPU available to the process (runtime.GOMAXPROCS(0)).
func WithWorkers(n int) Option {
	return optionFunc(func(c *config) {
		if n < 0 {
			c.errs = append(c.errs, fmt.Errorf("%w: WithWorkers(%d): must be >= 0", ErrInvalidOption, n))
			return
		}
		c.workers = n
	})
}

// WithWorkerHost sets the loopback address workers listen on, an IP
// literal such as "127.0.0.1" (the default) or "::1". "localhost" is taken
// as "127.0.0.1", so that the primary dials the family the workers listen
// on.
func WithWorkerHost(host string) Option {
	return optionFunc(func(c *config) {
		if host == "localhost" {
			host = DefaultWorkerHost
		}
		c.workerHost = host
	})
}

// WithBaseWorkerPort makes worker i listen on port base+i. Zero, the
// default, lets each worker listen on an ephemeral port that it reports to
// the primary.
func WithBaseWorkerPort(base int) Option {
	return optionFunc(func(c *config) { c.baseWorkerPort = base })
}

// WithInspectionTimeout bounds how long the primary waits for a complete
// request head before it routes whatever has arrived. The default is 10ms.
func WithInspectionTimeout(d time.Duration) Option {
	return optionFunc(func(c *config) { c.inspectionTimeout = d })
}

// WithMaxHeaderBytes caps how many bytes the primary buffers while sniffing
// a request head; once the cap is reached it routes what it has. The
// default is 16384.
func WithMaxHeaderBytes(n int) Option {
	return optionFunc(func(c *config) { c.maxHeaderBytes = n })
}

// WithHalfOpen sets whether a FIN from one side of a proxied connection is
// passed on while the other direction keeps flowing (true, the default), or
// closes the whole connection (false). Once the worker has finished
// sending, the client's direction flows while the client sends, and ends
// after a second without a byte: an HTTP server that closed reads no more.
func WithHalfOpen(on bool) Option {
	return optionFunc(func(c *config) { c.halfOpen = on })
}

// WithHeartbeat sets how often workers report their stats (default 1s), and
// after how long without a report a worker is stale (default 5s): a stale
// worker gets no new connections, and one that stays silent for another
// staleAfter is killed and replaced. staleAfter must exceed interval.
func WithHeartbeat(interval, staleAfter time.Duration) Option {
	return optionFunc(func(c *config) {
		c.heartbeat = interval
		c.staleAfter = staleAfter
	})
}

// WithShutdownTimeout bounds a graceful shutdown: in-flight requests get
// this long to finish before the remaining workers are killed. The default
// is 10s.
func WithShutdownTimeout(d time.Duration) Option {
	return optionFunc(func(c *config) { c.shutdownTimeout = d })
}

// WithStartTimeout bounds how long a new worker may take to report that it
// is ready; a worker that takes longer is killed. The default is 30s.
func WithStartTimeout(d time.Duration) Option {
	return optionFunc(func(c *config) { c.startTimeout = d })
}

// WithRespawn sets whether workers that exit unexpectedly are replaced
// (true, the default).
func WithRespawn(on bool) Option {
	return optionFunc(func(c *config) { c.respawn = on })
}

// WithBalancer sets the function that picks a worker for each new
// connection. A nil b keeps the default, [RoundRobin].
func WithBalancer(b Balancer) Option {
	return optionFunc(func(c *config) {
		if b != nil {
			c.balancer = b
		}
	})
}

// WithLogger sets the logger. A nil l keeps the default, [slog.Default].
func WithLogger(l *slog.Logger) Option {
	return optionFunc(func(c *config) {
		if l != nil {
			c.logger = l
		}
	})
}

// WithWorkerEnv adds "KEY=value" entries to the environment of every
// worker, on top of the primary's own environment.
func WithWorkerEnv(env ...string) Option {
	return optionFunc(func(c *config) {
		for _, kv := range env {
			if k, _, ok := strings.Cut(kv, "="); !ok || k == "" {
				c.errs = append(c.errs, fmt.Errorf("%w: WithWorkerEnv(%q): want KEY=value", ErrInvalidOption, kv))
				continue
			}
			c.workerEnv = append(c.workerEnv, kv)
		}
	})
}

// WithSignalHandling sets whether Start handles signals (true, the
// default): in the primary, the first SIGINT or SIGTERM starts a graceful
// shutdown and a second one stops at once, SIGHUP starts [Server.Restart],
// SIGUSR2 [Server.Upgrade], and SIGTTIN and SIGTTOU [Server.Scale] by one
// (these four are ignored while Start waits for the workers); a worker
// catches SIGINT and SIGTERM from the moment it starts and leaves the drain to its
// primary (systemd's KillMode=control-group and docker signal every
// process at once), and stops at once if its primary dies; in every
// process, SIGPIPE is caught, so that writing a log line to a closed
// stdout or stderr returns an error instead of killing the server. No
// worker is respawned once a shutdown has begun. With false, none of
// this: call [Server.Shutdown] yourself.
func WithSignalHandling(on bool) Option {
	return optionFunc(func(c *config) { c.signals = on })
}

// WithTrustedProxies makes the public listener accept a PROXY protocol
// header (v1 or v2) from connections whose source address lies in one of
// cidrs ("10.0.0.0/8", "127.0.0.1/32", "::1/128"), and pass the client
// address it carries on to the worker. A connection from anywhere else
// that starts with a PROXY header is closed and counted. A trusted source
// may also connect without a header. The header must arrive within the
// inspection timeout; a trusted connection that has sent nothing by then
// gets a second more for its first bytes, so that a header up to a second
// late is not taken for request bytes. By default no source is trusted and
// PROXY headers are not looked for.
func WithTrustedProxies(cidrs ...string) Option {
	return optionFunc(func(c *config) {
		for _, s := range cidrs {
			p, err := netip.ParsePrefix(s)
			if err != nil {
				c.errs = append(c.errs, fmt.Errorf("%w: WithTrustedProxies(%q): %w", ErrInvalidOption, s, err))
				continue
			}
			c.trusted = append(c.trusted, p.Masked())
		}
	})
}

// WithHealthPath makes the primary answer GET and HEAD requests for path
// itself, on connections whose first request asks for it: 200 while at
// least one worker takes connections and the server is not shutting down,
// 503 otherwise. Point a load balancer's or Kubernetes' health check at it
// so that it sees the real pool state and stops sending traffic before
// shutdown (see [WithDrainDelay]). The path is matched exactly, without
// the query string. By default there is none.
func WithHealthPath(path string) Option {
	return optionFunc(func(c *config) {
		if !strings.HasPrefix(path, "/") || strings.ContainsAny(path, "? \t\r\n") {
			c.errs = append(c.errs, fmt.Errorf("%w: WithHealthPath(%q): want an absolute path without query", ErrInvalidOption, path))
			return
		}
		c.healthPath = path
	})
}

// WithDrainDelay sets how long the primary keeps accepting and serving
// after a shutdown starts, while the health path already answers 503, so
// that load balancers take the instance out of rotation before its
// listener closes. The default is 0: the listener closes at once. The
// delay counts against nothing else: the shutdown timeout starts after it.
func WithDrainDelay(d time.Duration) Option {
	return optionFunc(func(c *config) {
		if d < 0 {
			c.errs = append(c.errs, fmt.Errorf("%w: WithDrainDelay(%v): must be >= 0", ErrInvalidOption, d))
			return
		}
		c.drainDelay = d
	})
}

// WithMaxConnections caps the client connections the primary holds at
// once, sniffing or forwarding. A connection over the cap is closed as soon
// as it is accepted, before anything is read, and counted in
// defuss.connections.refused. Zero, the default, means no cap (the
// process's file descriptor limit still applies). In hand-off mode
// ([WithHandoff]) the cap counts the connections the workers hold as
// well, from the hand-off until the worker reports the close (or exits).
func WithMaxConnections(n int) Option {
	return optionFunc(func(c *config) {
		if n < 0 {
			c.errs = append(c.errs, fmt.Errorf("%w: WithMaxConnections(%d): must be >= 0", ErrInvalidOption, n))
			return
		}
		c.maxConns = n
	})
}

// WithMaxRequests makes the primary recycle a worker once it has served n
// requests plus a random 0 to jitter more (so that workers started together
// do not all recycle together): a new worker is started, takes over once
// ready, and the old one drains, as in [Server.Restart]. Never more than
// one worker of the pool is being replaced at a time. Zero, the default,
// means never.
func WithMaxRequests(n, jitter int) Option {
	return optionFunc(func(c *config) {
		if n < 0 || jitter < 0 {
			c.errs = append(c.errs, fmt.Errorf("%w: WithMaxRequests(%d, %d): must be >= 0", ErrInvalidOption, n, jitter))
			return
		}
		c.maxRequests, c.maxRequestsJitter = uint64(n), uint64(jitter)
	})
}

// WithMaxMemory makes the primary recycle a worker whose resident set size,
// as its heartbeat reports it, reaches bytes, in the same way as
// [WithMaxRequests]. Zero, the default, means never.
func WithMaxMemory(bytes int64) Option {
	return optionFunc(func(c *config) {
		if bytes < 0 {
			c.errs = append(c.errs, fmt.Errorf("%w: WithMaxMemory(%d): must be >= 0", ErrInvalidOption, bytes))
			return
		}
		c.maxMemory = uint64(bytes)
	})
}

// WithHandoff switches the primary from splicing to handing connections
// off. The primary peeks at the request head without reading it
// (MSG_PEEK), picks a worker, and passes the connection's descriptor to it
// over a Unix socket (SCM_RIGHTS); the worker then serves the client
// directly, and r.RemoteAddr is the client's address with no header at
// all. The primary copies no byte, so this is the fastest mode. It does
// not see a connection's bytes or its end itself: the worker reports each
// close, with the connection's duration and bytes, for the connection
// counts and for defuss.connection.duration and defuss.connection.bytes
// (a connection whose worker dies before it reports the close is taken
// out of the counts, without a duration or bytes). A PROXY header from a
// load balancer that [WithTrustedProxies] trusts is checked by the
// primary, as in splice mode, and consumed by the worker, whose
// r.RemoteAddr is then the client address it carries. Connections
// that are not *net.TCPConn (from a [WithListener] that wraps them, such
// as a TLS listener) have no descriptor to pass: they are spliced, and
// the primary logs a warning once. The default is false: splice.
func WithHandoff(on bool) Option {
	return optionFunc(func(c *config) { c.handoff = on })
}

// Timeouts of the workers' server when the program's own server (or none,
// without [WithServer]) sets neither the timeout nor ReadTimeout: without
// them an idle or slow client would hold a connection, in the worker and
// in the primary, forever.
const (
	DefaultReadHeaderTimeout = 20 * time.Second
	DefaultIdleTimeout       = 2 * time.Minute
)

// WithServer makes each worker serve with srv's settings instead of a
// default server: ReadTimeout, ReadHeaderTimeout, WriteTimeout,
// IdleTimeout, MaxHeaderBytes, ErrorLog, BaseContext, ConnContext,
// ConnState (called after defuss's own bookkeeping), HTTP2, Protocols and
// DisableGeneralOptionsHandler, TLSConfig and TLSNextProto. Functions registered with
// srv.RegisterOnShutdown run when the worker begins to drain (a restart,
// a recycle, a scale-down or a shutdown), so that long handlers (SSE,
// WebSockets) can say goodbye and return.
//
// srv.Handler serves when Start's handler is nil; setting both is an
// error. srv.Addr, when set, is the public address unless [WithAddr] is
// given (it wins over PORT and LISTEN_HOST too).
//
// defuss owns srv's listener and connections: the workers serve a server
// of their own with srv's settings, and srv itself never serves (do not
// call its Serve or ListenAndServe; call [Server.Shutdown] to stop).
//
// With a TLSConfig that has certificates (or GetCertificate or
// GetConfigForClient), the workers serve HTTPS and negotiate HTTP/2 by
// ALPN as net/http's ServeTLS does; the primary never terminates TLS, so
// r.TLS is set in the handlers. Certificates load when the worker starts:
// to renew them, replace the files and restart ([Server.Restart],
// SIGHUP). When srv sets neither ReadHeaderTimeout
// nor ReadTimeout, the workers use DefaultReadHeaderTimeout; when it sets
// neither IdleTimeout nor ReadTimeout, DefaultIdleTimeout (a negative
// value turns either off, as in net/http). A nil srv keeps the default:
// a server with only those two timeouts.
func WithServer(srv *http.Server) Option {
	return optionFunc(func(c *config) {
		if srv != nil {
			c.server = srv
		}
	})
}

// trusts reports whether a PROXY header from a is to be believed.
func (c *config) trusts(a netip.Addr) bool {
	a = a.Unmap()
	for _, p := range c.trusted {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// newConfig sets every default, applies opts, and validates the result.
// getenv is os.Getenv outside tests.
func newConfig(getenv func(string) string, opts ...Option) (*config, error) {
	c := &config{
		addr:              envAddr(getenv),
		workerHost:        DefaultWorkerHost,
		inspectionTimeout: DefaultInspectionTimeout,
		maxHeaderBytes:    DefaultMaxHeaderBytes,
		halfOpen:          true,
		heartbeat:         DefaultHeartbeatInterval,
		staleAfter:        DefaultHeartbeatStale,
		shutdownTimeout:   DefaultShutdownTimeout,
		startTimeout:      DefaultStartTimeout,
		dialTimeout:       defaultDialTimeout,
		respawn:           true,
		signals:           true,
		logger:            slog.Default(),
		meterProvider:     otel.GetMeterProvider(),
	}
	for _, o := range opts {
		if o != nil {
			o.apply(c)
		}
	}
	if c.workers == 0 {
		c.workers = runtime.GOMAXPROCS(0)
	}
	if c.server != nil && c.server.Addr != "" && !c.addrSet && c.listener == nil {
		c.addr = c.server.Addr
	}
	if c.balancer == nil {
		c.balancer = RoundRobin()
	}
	// An explicit WithListener wins over socket activation, as WithAddr
	// wins over PORT; an Upgrade's socket wins over everything.
	if c.listener == nil || getenv(envUpgradeFrom) != "" {
		inh, err := inheritedFromEnv(getenv, os.Getpid(), os.Getppid(), c.socketName)
		if err != nil {
			c.errs = append(c.errs, err)
		}
		c.inherited = inh
	}
	if err := c.validate(); err != nil {
		return nil, err
	}
	return c, nil
}

// envAddr is the default public address: ":3000", with PORT/LISTEN_PORT and
// LISTEN_HOST applied, as PaaS platforms set them.
func envAddr(getenv func(string) string) string {
	host, port := "", "3000"
	if p := getenv("PORT"); p != "" {
		port = p
	} else if p := getenv("LISTEN_PORT"); p != "" {
		port = p
	}
	if h := getenv("LISTEN_HOST"); h != "" {
		host = h
	}
	return net.JoinHostPort(host, port)
}

func (c *config) validate() error {
	errs := c.errs
	bad := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("%w: "+format, append([]any{ErrInvalidOption}, args...)...))
	}
	publicPort := -1
	if c.inherited != nil {
		// The address is systemd's or the predecessor's: not known yet.
	} else if c.listener == nil {
		_, port, err := net.SplitHostPort(c.addr)
		if err != nil {
			bad("WithAddr(%q) (or PORT/LISTEN_HOST): %v", c.addr, err)
		} else if p, err := strconv.Atoi(port); err != nil || p < 0 || p > 65535 {
			bad("WithAddr(%q) (or PORT/LISTEN_PORT): port must be a number from 0 to 65535", c.addr)
		} else {
			publicPort = p
		}
	} else if a, ok := c.listener.Addr().(*net.TCPAddr); ok {
		publicPort = a.Port
	}
	if c.workers > maxWorkers {
		bad("WithWorkers(%d): at most %d", c.workers, maxWorkers)
	}
	if c.workerHost == "" {
		bad("WithWorkerHost(%q): empty host", c.workerHost)
	} else if ip := net.ParseIP(c.workerHost); ip == nil || !ip.IsLoopback() {
		bad("WithWorkerHost(%q): workers must listen on a loopback IP address", c.workerHost)
	}
	if err := c.checkWorkerPorts(c.workers, publicPort); err != nil {
		errs = append(errs, err)
	}
	if c.inspectionTimeout <= 0 || c.inspectionTimeout > maxDuration {
		bad("WithInspectionTimeout(%v): must be > 0 and at most %v", c.inspectionTimeout, maxDuration)
	}
	if c.maxHeaderBytes < 64 || c.maxHeaderBytes > 1<<20 {
		bad("WithMaxHeaderBytes(%d): must be within 64 to 1048576", c.maxHeaderBytes)
	}
	if c.heartbeat < time.Millisecond {
		bad("WithHeartbeat(%v, %v): interval must be >= 1ms", c.heartbeat, c.staleAfter)
	} else if c.staleAfter > maxDuration {
		bad("WithHeartbeat(%v, %v): staleAfter must be at most %v", c.heartbeat, c.staleAfter, maxDuration)
	} else if c.staleAfter <= c.heartbeat {
		bad("WithHeartbeat(%v, %v): staleAfter must exceed interval", c.heartbeat, c.staleAfter)
	}
	if c.shutdownTimeout <= 0 || c.shutdownTimeout > maxDuration {
		bad("WithShutdownTimeout(%v): must be > 0 and at most %v", c.shutdownTimeout, maxDuration)
	}
	if c.drainDelay > maxDuration {
		bad("WithDrainDelay(%v): must be at most %v", c.drainDelay, maxDuration)
	}
	if c.maxRequestsJitter > math.MaxInt64-c.maxRequests {
		bad("WithMaxRequests(%d, %d): the limit plus its jitter must fit in an int64", c.maxRequests, c.maxRequestsJitter)
	}
	if s := c.server; s != nil && s.TLSConfig != nil && len(s.TLSConfig.Certificates) == 0 &&
		s.TLSConfig.GetCertificate == nil && s.TLSConfig.GetConfigForClient == nil {
		bad("WithServer: TLSConfig has no certificate (Certificates, GetCertificate or GetConfigForClient)")
	}
	if c.startTimeout <= 0 || c.startTimeout > maxDuration {
		bad("WithStartTimeout(%v): must be > 0 and at most %v", c.startTimeout, maxDuration)
	}
	return errors.Join(errs...)
}

// checkWorkerPorts checks that, for n workers, the fixed worker ports of
// WithBaseWorkerPort lie within 1-65535 and miss the public port. Start
// checks it for the initial workers, Scale for the new count.
func (c *config) checkWorkerPorts(n, publicPort int) error {
	base := c.baseWorkerPort
	switch {
	case base < 0 || base > 65535 || base+n-1 > 65535:
		return fmt.Errorf("%w: WithBaseWorkerPort(%d): worker ports must lie within 1-65535 for %d workers", ErrInvalidOption, base, n)
	case base > 0 && publicPort > 0 && publicPort >= base && publicPort < base+n:
		return fmt.Errorf("%w: WithBaseWorkerPort(%d): worker ports %d-%d collide with the public port %d", ErrInvalidOption, base, base, base+n-1, publicPort)
	}
	return nil
}

// workerProcs is the GOMAXPROCS each worker gets: the primary's CPUs shared
// among the workers, at least one.
func (c *config) workerProcs() int {
	return max(1, runtime.GOMAXPROCS(0)/c.workers)
}

// WithMeterProvider sets the OpenTelemetry meter provider of the primary's
// metrics. A nil mp keeps the default, otel.GetMeterProvider().
func WithMeterProvider(mp metric.MeterProvider) Option {
	return optionFunc(func(c *config) {
		if mp != nil {
			c.meterProvider = mp
		}
	})
}
