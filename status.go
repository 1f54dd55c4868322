package defuss

import (
	"encoding/json"
	"net/http"
	"time"
)

// StatusHandler returns an http.Handler that serves the state of s's
// worker pool as JSON: per worker its index, pid, state, uptime, seconds
// since the last heartbeat, restarts, connections and resource use. It is
// meant for an admin listener on a private address, not for the public
// port (which only workers serve anyway). In a worker, it serves 404.
func StatusHandler(s *Server) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if s == nil || s.p == nil {
			http.NotFound(w, r)
			return
		}
		now := time.Now()
		type worker struct {
			Index             int     `json:"index"`
			PID               int     `json:"pid"`
			State             string  `json:"state"`
			Healthy           bool    `json:"healthy"`
			Addr              string  `json:"addr,omitempty"`
			UptimeSeconds     float64 `json:"uptime_seconds"`
			HeartbeatAge      float64 `json:"heartbeat_age_seconds"`
			Restarts          int     `json:"restarts"`
			ActiveConnections int64   `json:"active_connections"`
			CPUPercent        float64 `json:"cpu_percent"`
			RSSBytes          uint64  `json:"rss_bytes"`
			HeapInUseBytes    uint64  `json:"heap_in_use_bytes"`
			HeapTotalBytes    uint64  `json:"heap_total_bytes"`
			Goroutines        int     `json:"goroutines"`
		}
		out := struct {
			PID      int      `json:"pid"`
			Addr     string   `json:"addr"`
			Draining bool     `json:"draining"`
			Ready    int      `json:"ready"`
			Workers  []worker `json:"workers"`
		}{PID: s.p.pid, Addr: s.p.ln.Addr().String(), Draining: s.p.life.draining.Load()}
		for _, wi := range s.Workers() {
			o := worker{Index: wi.Index, PID: wi.PID, State: wi.State.String(), Healthy: wi.Healthy, Addr: wi.Addr,
				Restarts: wi.Restarts, ActiveConnections: wi.ActiveConnections(),
				CPUPercent: wi.Stats.CPUPercent, RSSBytes: wi.Stats.RSS, HeapInUseBytes: wi.Stats.HeapInUse,
				HeapTotalBytes: wi.Stats.HeapTotal, Goroutines: wi.Stats.Goroutines}
			if wi.PID != 0 {
				o.UptimeSeconds = now.Sub(wi.Started).Seconds()
			}
			if !wi.LastHeartbeat.IsZero() {
				o.HeartbeatAge = now.Sub(wi.LastHeartbeat).Seconds()
			}
			if wi.Healthy {
				out.Ready++
			}
			out.Workers = append(out.Workers, o)
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.Encode(out)
	})
}
