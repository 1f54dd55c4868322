// Package proc holds the platform-specific parts of starting and watching
// worker processes.
package proc
