package defuss

import (
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"

	"github.com/coreos/go-systemd/v22/daemon"
)

// A notifier tells the service manager (systemd, Type=notify) what the
// primary does, when NOTIFY_SOCKET is set (sd_notify(3)): READY=1 once it
// serves, RELOADING=1 and READY=1 around a rolling restart or an upgrade,
// MAINPID= from the new primary of an upgrade, STOPPING=1 when it shuts
// down, each with a STATUS= line that counts the workers ready. Without
// NOTIFY_SOCKET it does nothing.
type notifier struct {
	log    *slog.Logger
	socket string // NOTIFY_SOCKET when the primary started
	warn   sync.Once
}

func newNotifier(log *slog.Logger) *notifier {
	return &notifier{log: log, socket: os.Getenv(envNotifySocket)}
}

// send sends one message, the lines of state. A failure is logged once:
// the service manager is gone or the socket is wrong, and the server goes
// on serving either way.
func (n *notifier) send(state string) {
	if n.socket == "" {
		return
	}
	if _, err := daemon.SdNotify(false, state); err != nil {
		n.warn.Do(func() {
			n.log.Warn("cannot notify the service manager", "socket", n.socket, "err", err)
		})
	}
}

// ready says the server serves, with the workers of v.
func (n *notifier) ready(v *poolView) {
	n.send(daemon.SdNotifyReady + "\n" + status(v))
}

// takeOver says this process, the new primary of an upgrade, is now the
// service's main process and serves.
func (n *notifier) takeOver(v *poolView) {
	n.send("MAINPID=" + strconv.Itoa(os.Getpid()) + "\n" + daemon.SdNotifyReady + "\n" + status(v))
}

// reloading says a rolling restart or an upgrade has begun.
func (n *notifier) reloading(what string) {
	n.send(daemon.SdNotifyReloading + "\n" + daemon.SdNotifyMonotonicUsec() + "STATUS=" + what)
}

// stopping says the server shuts down.
func (n *notifier) stopping() {
	n.send(daemon.SdNotifyStopping + "\nSTATUS=shutting down")
}

// keep says an upgrade failed and this process serves on: the reload
// is over.
func (n *notifier) keep(why string) {
	why = strings.ReplaceAll(why, "\n", " ")
	n.send(daemon.SdNotifyReady + "\nSTATUS=upgrade failed: " + why)
}

func status(v *poolView) string {
	return fmt.Sprintf("STATUS=%d of %d workers ready", len(v.cands), len(v.all))
}
