//go:build !race

package defuss

// raceEnabled: the race detector's own memory makes RSS no measure of ours.
const raceEnabled = false
