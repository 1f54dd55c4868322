// Package defuss turns a net/http program into a multi-process server with
// one call: a primary process that balances connections across N worker
// processes running the same binary.
//
// Typical usage:
//
//	func main() {
//		mux := http.NewServeMux()
//		mux.HandleFunc("/", hello)
//		if err := defuss.Run(mux); err != nil {
//			log.Fatal(err)
//		}
//	}
//
// # Code before Start runs in every process
//
// Start re-executes the program's own binary (os.Executable, with the same
// arguments) once per worker. EVERYTHING main does before it calls Start or
// Run therefore runs in the primary AND IN EVERY WORKER: opening files,
// connecting to databases, printing banners, binding other ports. It runs
// once more in the new primary of every [Server.Upgrade], while the old
// primary still serves: a port that main binds itself is taken then. Keep
// such work cheap and idempotent, or do it after Start returns and only
// when [IsWorker] says which role this process has.
//
// # Process model
//
// The primary listens on the public address (":3000" by default). For each
// new TCP connection it reads the start of the HTTP/1.x request head (for
// at most 10ms and 16 KiB by default), asks a [Balancer] which worker takes
// the connection, dials that worker on its loopback port, writes a PROXY
// header (the client's address) and the bytes it read, and then copies the
// two TCP streams (on Linux in a few epoll event loops, with no goroutine
// per connection). With [WithHandoff] it
// instead peeks at the head and passes the connection itself to the worker.
// Routing is per connection: every request on a keep-alive connection goes
// to the same worker. Workers serve the handler with an http.Server on a
// loopback port (with the settings of the program's own server, given with
// [WithServer]) and report readiness and heartbeats (CPU, RSS, Go heap,
// connections) to the primary over an inherited pipe. The primary replaces
// workers that die, with exponential backoff, replaces them one at a time
// on [Server.Restart] or SIGHUP, replaces itself and its workers with the
// binary on disk on [Server.Upgrade] or SIGUSR2 (passing the listening
// socket on, so no connection is refused), and on SIGINT/SIGTERM or [Server.Shutdown]
// stops accepting, lets in-flight requests finish, and kills what is left
// after the shutdown timeout. A draining worker keeps serving hijacked
// connections (WebSockets) until they end, answers further requests on
// keep-alive connections with Connection: close, and runs the server's
// RegisterOnShutdown hooks when the drain begins.
//
// # What defuss does not do
//
// It does not terminate TLS in the primary (the workers do, with
// [WithServer]; the primary reads the ClientHello's server name for the
// [Balancer] and passes it on unchanged), and it does not route request by
// request. Under "go run", the binary that workers re-execute
// is a temporary build; that works, but build the program for production.
//
// # Platforms
//
// defuss builds for Linux, macOS, the BSDs and Windows. It runs workers on
// Linux, macOS and the BSDs: all of them have inherited pipes, process groups and
// SCM_RIGHTS. Linux adds event loops (epoll) for splice mode's copying
// (elsewhere two goroutines per connection copy through a pooled buffer)
// and a parent-death signal as
// a second guard against orphaned workers (elsewhere a worker stops when
// its control pipe reaches EOF, which happens on Linux too).
//
// On Windows, which cannot pass pipes or sockets to a child this way,
// [Start] and [Run] return [ErrNotSupported] before they bind or spawn
// anything. defuss does not quietly serve in one process instead: main
// decides, for example to keep a Windows laptop working in development:
//
//	err := defuss.Run(mux)
//	if errors.Is(err, defuss.ErrNotSupported) {
//		log.Print("no worker processes on this platform; serving in one process")
//		err = http.ListenAndServe(":3000", mux)
//	}
package defuss
