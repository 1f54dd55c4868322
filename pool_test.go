package defuss

import (
	"encoding/json"
	"strings"
	"testing"
)

// WorkerState prints and marshals as its name, as StatusHandler and the
// README call the states.
func TestWorkerStateNames(t *testing.T) {
	for st, want := range map[WorkerState]string{
		WorkerStarting: "starting", WorkerReady: "ready", WorkerStale: "stale",
		WorkerUnhealthy: "unhealthy", WorkerDraining: "draining", WorkerDown: "down",
		WorkerState(42): "WorkerState(42)", WorkerState(-1): "WorkerState(-1)",
	} {
		if got := st.String(); got != want {
			t.Errorf("WorkerState(%d).String() = %q, want %q", int(st), got, want)
		}
	}
	b, err := json.Marshal(WorkerInfo{Index: 1, State: WorkerDraining})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), `"State":"draining"`) {
		t.Errorf("JSON of a WorkerInfo: %s, want the state by name", b)
	}
}
