package defuss

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"
)

// The hand-off messages a primary sends, as the worker decodes them.
func TestDecodeHandoff(t *testing.T) {
	v4 := netip.MustParseAddrPort("203.0.113.7:5555")
	v6 := netip.MustParseAddrPort("[2001:db8::1]:443")
	mapped := netip.AddrPortFrom(netip.AddrFrom16(v4.Addr().As16()), 80)
	for _, tc := range []struct {
		name string
		msg  handoffMsg
		want []byte
	}{
		{"version 1: a primary before version 2", handoffMsg{version: handoffV1}, []byte{1}},
		{"no PROXY header", handoffMsg{version: handoffV2}, []byte{2, 0, 0}},
		{"v1 header, IPv4 client", handoffMsg{version: handoffV2, proxied: 45, client: v4},
			[]byte{2, 0, 45, 4, 203, 0, 113, 7, 0x15, 0xb3}},
		{"v2 header, IPv6 client", handoffMsg{version: handoffV2, proxied: proxyV2Max, client: v6},
			append(append([]byte{2, 2, 16, 6}, v6.Addr().AsSlice()...), 1, 187)},
		{"IPv4-mapped IPv6 client stays IPv6", handoffMsg{version: handoffV2, proxied: 28, client: mapped},
			append(append([]byte{2, 0, 28, 6}, mapped.Addr().AsSlice()...), 0, 80)},
		{"version 3: IPv4 peer, options set", handoffMsg{version: handoffV3, optsSet: true, peer: v4},
			[]byte{3, 1, 0, 0, 4, 203, 0, 113, 7, 0x15, 0xb3}},
		{"version 3: IPv6 peer, options not set", handoffMsg{version: handoffV3, peer: v6},
			append(append([]byte{3, 0, 0, 0, 6}, v6.Addr().AsSlice()...), 1, 187)},
		{"version 3: a proxy's IPv4 peer, an IPv6 client", handoffMsg{version: handoffV3, optsSet: true, proxied: proxyV2Max, peer: v4, client: v6},
			append(append([]byte{3, 1, 2, 16, 4, 203, 0, 113, 7, 0x15, 0xb3, 6}, v6.Addr().AsSlice()...), 1, 187)},
		{"version 3: IPv4-mapped IPv6 peer stays IPv6", handoffMsg{version: handoffV3, optsSet: true, peer: mapped},
			append(append([]byte{3, 1, 0, 0, 6}, mapped.Addr().AsSlice()...), 0, 80)},
		{"the longest", handoffMsg{version: handoffV3, optsSet: true, proxied: 60, peer: v6, client: v6},
			append(append(append(append([]byte{3, 1, 0, 60, 6}, v6.Addr().AsSlice()...), 1, 187, 6), v6.Addr().AsSlice()...), 1, 187)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := appendHandoff(nil, tc.msg)
			if !bytes.Equal(b, tc.want) {
				t.Fatalf("encoded %x, want %x", b, tc.want)
			}
			if len(b) > handoffMsgMax {
				t.Fatalf("%d bytes, over handoffMsgMax %d", len(b), handoffMsgMax)
			}
			m, err := decodeHandoff(b)
			if err != nil || m != tc.msg {
				t.Fatalf("decoded %+v, %v; want %+v", m, err, tc.msg)
			}
		})
	}
	good := appendHandoff(nil, handoffMsg{version: handoffV2, proxied: 45, client: v4})
	good3 := appendHandoff(nil, handoffMsg{version: handoffV3, optsSet: true, proxied: 45, peer: v4, client: v4})
	if _, err := decodeHandoff(good3); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		b    []byte
	}{
		{"empty", nil},
		{"version 0", []byte{0}},
		{"version 4: a batch, not decodeHandoff's", append([]byte{4, 1}, good3[1:]...)},
		{"version 5: a newer primary", append([]byte{5}, good3[1:]...)},
		{"version 3 without a peer", []byte{3, 1, 0, 0}},
		{"version 3 cut short", []byte{3, 1, 0}},
		{"version 3 with an unknown flag", append([]byte{3, 3}, good3[2:]...)},
		{"version 3 with a header, without a client", good3[:len(good3)-7]},
		{"version 3 without a header, with a client", append([]byte{3, 1, 0, 0}, good3[4:]...)},
		{"version 3 with a peer of family 5", append(append([]byte{3, 1, 0, 45, 5}, good3[5:11]...), good3[11:]...)},
		{"version 3 one byte too long", append(bytes.Clone(good3), 0)},
		{"version 3 header longer than any accepted", append([]byte{3, 1, 2, 17}, good3[4:]...)},
		{"version 1 with more bytes", []byte{1, 0, 0}},
		{"version 2 cut short", []byte{2, 0}},
		{"no header, with an address", append([]byte{2, 0, 0}, good[3:]...)},
		{"a header, without an address", []byte{2, 0, 45}},
		{"header longer than any accepted", append([]byte{2, 2, 17}, good[3:]...)},
		{"family 5", append([]byte{2, 0, 45, 5}, good[4:]...)},
		{"family 4 with an IPv6 address", append(append([]byte{2, 0, 45, 4}, v6.Addr().AsSlice()...), 0, 1)},
		{"one byte long", append(bytes.Clone(good), 0)},
		{"one byte short", good[:len(good)-1]},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if m, err := decodeHandoff(tc.b); !errors.Is(err, errFrame) {
				t.Fatalf("decodeHandoff(%x) = %+v, %v; want errFrame", tc.b, m, err)
			}
		})
	}
}

// A version 4 message: its records, each a version 3 message's body, in
// order, as many as the header says, 1 to handoffBatchMax of them.
func TestDecodeHandoffBatch(t *testing.T) {
	v4 := netip.MustParseAddrPort("203.0.113.7:5555")
	v6 := netip.MustParseAddrPort("[2001:db8::1]:443")
	batch := func(ms ...handoffMsg) []byte {
		b := []byte{handoffV4, byte(len(ms))}
		for _, m := range ms {
			b = appendHandoffRecord(b, m)
		}
		return b
	}
	one := handoffMsg{version: handoffV3, optsSet: true, peer: v4}
	longest := handoffMsg{version: handoffV3, optsSet: true, proxied: 60, peer: v6, client: v6}
	full := slices.Repeat([]handoffMsg{longest}, handoffBatchMax)
	for _, tc := range []struct {
		name string
		ms   []handoffMsg
	}{
		{"one", []handoffMsg{one}},
		{"mixed families, options, PROXY headers", []handoffMsg{one, {version: handoffV3, peer: v6}, longest, one}},
		{"the longest", full},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := batch(tc.ms...)
			if want := append([]byte{handoffV4, byte(len(tc.ms))}, appendHandoff(nil, tc.ms[0])[1:]...); !bytes.HasPrefix(b, want) {
				t.Fatalf("encoded %x; its first record is not version 3's body %x", b, want)
			}
			if len(b) > handoffBatchMsgMax {
				t.Fatalf("%d bytes, over handoffBatchMsgMax %d", len(b), handoffBatchMsgMax)
			}
			got, err := decodeHandoffBatch(b, nil)
			if err != nil || !slices.Equal(got, tc.ms) {
				t.Fatalf("decoded %+v, %v; want %+v", got, err, tc.ms)
			}
		})
	}
	good := batch(one, longest)
	for _, tc := range []struct {
		name string
		b    []byte
	}{
		{"empty", nil},
		{"no count", []byte{handoffV4}},
		{"no records", []byte{handoffV4, 0}},
		{"more records than a batch holds", batch(append(full, one)...)},
		{"a count over the records", append([]byte{handoffV4, 3}, good[2:]...)},
		{"a count under the records", append([]byte{handoffV4, 1}, good[2:]...)},
		{"the last record cut short", good[:len(good)-1]},
		{"one byte too long", append(bytes.Clone(good), 0)},
		{"a version 3 message", appendHandoff(nil, one)},
		{"a record with an unknown flag", append([]byte{handoffV4, 1, 3}, appendHandoff(nil, one)[2:]...)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if ms, err := decodeHandoffBatch(tc.b, nil); !errors.Is(err, errFrame) {
				t.Fatalf("decodeHandoffBatch(%x) = %+v, %v; want errFrame", tc.b, ms, err)
			}
		})
	}
}

// handoffFor sends version 3, but for a peer the message cannot carry:
// the worker then asks the socket (version 2) and sets the options.
func TestHandoffFor(t *testing.T) {
	client := netip.MustParseAddrPort("203.0.113.7:5555")
	for _, tc := range []struct {
		name string
		peer netip.AddrPort
		want handoffMsg
	}{
		{"IPv4", netip.MustParseAddrPort("127.0.0.1:4000"),
			handoffMsg{version: handoffV3, optsSet: true, proxied: 45, peer: netip.MustParseAddrPort("127.0.0.1:4000"), client: client}},
		{"IPv6", netip.MustParseAddrPort("[::1]:4000"),
			handoffMsg{version: handoffV3, optsSet: true, proxied: 45, peer: netip.MustParseAddrPort("[::1]:4000"), client: client}},
		{"link-local IPv6 with a zone", netip.MustParseAddrPort("[fe80::1%eth0]:4000"),
			handoffMsg{version: handoffV2, proxied: 45, client: client}},
		{"none", netip.AddrPort{}, handoffMsg{version: handoffV2, proxied: 45, client: client}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := handoffFor(tc.peer, true, 45, client)
			if m != tc.want {
				t.Fatalf("handoffFor = %+v, want %+v", m, tc.want)
			}
			if got, err := decodeHandoff(appendHandoff(nil, m)); err != nil || got != m {
				t.Fatalf("decoded %+v, %v; want %+v", got, err, m)
			}
		})
	}
}

// A worker that decodes only version 2 gets what version 2 carries: the
// PROXY header's length and the client, without the peer and the flag.
func TestHandoffUpTo(t *testing.T) {
	client := netip.MustParseAddrPort("203.0.113.7:5555")
	peer := netip.MustParseAddrPort("10.0.0.1:4000")
	m3 := handoffMsg{version: handoffV3, optsSet: true, proxied: 45, peer: peer, client: client}
	for _, tc := range []struct {
		v    byte
		want handoffMsg
	}{
		{handoffV3, m3},
		{9, m3},
		{handoffV2, handoffMsg{version: handoffV2, proxied: 45, client: client}},
	} {
		m := m3.upTo(tc.v)
		if m != tc.want {
			t.Errorf("upTo(%d) = %+v, want %+v", tc.v, m, tc.want)
		}
		if got, err := decodeHandoff(appendHandoff(nil, m)); err != nil || got != tc.want {
			t.Errorf("upTo(%d) decoded: %+v, %v; want %+v", tc.v, got, err, tc.want)
		}
	}
}

// FuzzDecodeHandoff checks that decodeHandoff never panics and that what
// it accepts re-encodes to the very same bytes.
func FuzzDecodeHandoff(f *testing.F) {
	f.Add([]byte{1})
	f.Add([]byte{2, 0, 0})
	f.Add(appendHandoff(nil, handoffMsg{version: handoffV2, proxied: 45, client: netip.MustParseAddrPort("203.0.113.7:5555")}))
	f.Add(appendHandoff(nil, handoffMsg{version: handoffV2, proxied: 64, client: netip.MustParseAddrPort("[2001:db8::1]:443")}))
	f.Add(appendHandoff(nil, handoffMsg{version: handoffV3, optsSet: true, peer: netip.MustParseAddrPort("127.0.0.1:40000")}))
	f.Add(appendHandoff(nil, handoffMsg{version: handoffV3, proxied: 45, peer: netip.MustParseAddrPort("[::1]:40000"),
		client: netip.MustParseAddrPort("203.0.113.7:5555")}))
	f.Add(append(appendHandoffRecord([]byte{handoffV4, 2}, handoffMsg{optsSet: true, peer: netip.MustParseAddrPort("127.0.0.1:40000")}),
		appendHandoffRecord(nil, handoffMsg{proxied: 45, peer: netip.MustParseAddrPort("[::1]:40000"), client: netip.MustParseAddrPort("203.0.113.7:5555")})...))
	f.Fuzz(func(t *testing.T, b []byte) {
		orig := bytes.Clone(b)
		checkHandoffBatch(t, b)
		m, err := decodeHandoff(b)
		if !bytes.Equal(b, orig) {
			t.Fatal("decodeHandoff modified its input")
		}
		if err != nil {
			if !errors.Is(err, errFrame) {
				t.Fatalf("error %v does not wrap errFrame", err)
			}
			return
		}
		if b2 := appendHandoff(nil, m); !bytes.Equal(b2, b) {
			t.Fatalf("re-encoding %+v gave %x, want %x", m, b2, b)
		}
		if m.proxied > 0 && !m.client.IsValid() {
			t.Fatalf("%+v: a PROXY header without a client address", m)
		}
		if m.version == handoffV3 && !m.peer.IsValid() {
			t.Fatalf("%+v: version 3 without the peer's address", m)
		}
	})
}

// checkHandoffBatch is FuzzDecodeHandoff's for decodeHandoffBatch: it
// refuses with errFrame or decodes what re-encodes to b.
func checkHandoffBatch(t *testing.T, b []byte) {
	t.Helper()
	ms, err := decodeHandoffBatch(b, nil)
	if err != nil {
		if !errors.Is(err, errFrame) {
			t.Fatalf("error %v does not wrap errFrame", err)
		}
		return
	}
	if len(ms) < 1 || len(ms) > handoffBatchMax {
		t.Fatalf("a batch of %d records", len(ms))
	}
	b2 := []byte{handoffV4, byte(len(ms))}
	for _, m := range ms {
		if m.version != handoffV3 || !m.peer.IsValid() || m.proxied > 0 && !m.client.IsValid() {
			t.Fatalf("record %+v: not a whole version 3 message", m)
		}
		b2 = appendHandoffRecord(b2, m)
	}
	if !bytes.Equal(b2, b) {
		t.Fatalf("re-encoding %+v gave %x, want %x", ms, b2, b)
	}
}

// Issue 14: a worker reports the closes of connections from a version 1
// primary by count alone, which that primary decodes, and the others with
// their durations and bytes, in frames of at most maxClosedStats, the
// bytes in the first; past maxPendingCloses waiting, by count alone.
func TestWorkerCloseReports(t *testing.T) {
	r, wr, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer wr.Close()
	w := &worker{slot: 1, status: wr, kick: make(chan struct{}, 1)}
	frames := make(chan []message, 1)
	go func() {
		var ms []message
		buf := make([]byte, maxFramePayload)
		for {
			typ, p, err := readFrame(r, buf)
			if err != nil {
				frames <- ms
				return
			}
			m, err := decodeMessage(typ, p)
			if err != nil {
				t.Errorf("decode: %v", err)
			}
			ms = append(ms, m)
		}
	}()
	closeConn := func(stats bool, in, out int64) {
		c := &workerConn{handed: true, stats: stats, since: time.Now()}
		c.in.Store(in)
		c.out.Store(out)
		w.handedClose(c)
	}
	closeConn(false, 5, 5) // from a version 1 primary
	w.handedClose(nil)     // not served
	const withStats = 2*maxClosedStats + 3
	for range withStats {
		closeConn(true, 10, 1000)
	}
	var batch closeBatch
	if err := w.flushCloses(&batch); err != nil {
		t.Fatal(err)
	}
	for range maxPendingCloses + 1 {
		closeConn(true, 1, 1)
	}
	if err := w.flushCloses(&batch); err != nil {
		t.Fatal(err)
	}
	wr.Close()
	ms := <-frames

	var got []string
	var in, out uint64
	closes := 0
	for _, m := range ms {
		if m.kind != frameClosed || len(m.durations) != 0 && len(m.durations) != m.closed {
			t.Fatalf("frame %+v", m)
		}
		got = append(got, fmt.Sprintf("%d/%d", m.closed, len(m.durations)))
		in, out, closes = in+m.bytesIn, out+m.bytesOut, closes+m.closed
		if m.bytesIn != 0 && m.bytesIn != withStats*10 && m.bytesIn != maxPendingCloses {
			t.Errorf("bytes in %d: want all of a flush's in its first frame", m.bytesIn)
		}
	}
	want := []string{"2/0", "124/124", "124/124", "3/3", "1/0"}
	for range maxPendingCloses / maxClosedStats {
		want = append(want, "124/124")
	}
	want = append(want, fmt.Sprintf("%d/%d", maxPendingCloses%maxClosedStats, maxPendingCloses%maxClosedStats))
	if !slices.Equal(got, want) {
		t.Errorf("frames (closed/durations) %v,\nwant %v", got, want)
	}
	if closes != 2+withStats+maxPendingCloses+1 || in != withStats*10+maxPendingCloses || out != withStats*1000+maxPendingCloses {
		t.Errorf("%d closes, %d bytes in, %d out", closes, in, out)
	}
}

// TestCloseReportGapFor: 1 ms a worker, from 2 ms to 16 ms.
func TestCloseReportGapFor(t *testing.T) {
	ms := time.Millisecond
	for _, tt := range []struct {
		n    int
		want time.Duration
	}{{0, 2 * ms}, {1, 2 * ms}, {2, 2 * ms}, {3, 3 * ms}, {8, 8 * ms}, {16, 16 * ms}, {17, 16 * ms}, {maxWorkers, 16 * ms}} {
		if got := closeReportGapFor(tt.n); got != tt.want {
			t.Errorf("closeReportGapFor(%d) = %v, want %v", tt.n, got, tt.want)
		}
	}
}

// TestWorkerTakesReportGap: a worker's command reader sets the gap between
// close reports from the primary's frame, keeps it across a malformed
// one, and uses closeReportGap until told.
func TestWorkerTakesReportGap(t *testing.T) {
	r, wr, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	logs := &syncBuffer{}
	w := &worker{control: r, stop: make(chan stopRequest, 1), force: make(chan struct{}), done: make(chan struct{}),
		log: slog.New(slog.NewTextHandler(logs, nil))}
	if g := w.reportGap(); g != closeReportGap {
		t.Fatalf("gap before the primary said: %v, want %v", g, closeReportGap)
	}
	w.wg.Add(1)
	go w.commands()
	defer func() {
		close(w.done) // the pipe's end below is ours, not the primary's going
		wr.Close()
		w.wg.Wait()
	}()
	bad := appendCommand(nil, &command{kind: frameReportGap, reportGap: 8 * time.Millisecond})
	binary.BigEndian.PutUint64(bad[frameHeaderLen:], uint64(time.Millisecond)) // under the least
	b := appendCommand(nil, &command{kind: frameReportGap, reportGap: 8 * time.Millisecond})
	b = append(b, bad...)
	b = appendCommand(b, &command{kind: frameDrain, shutdownTimeout: time.Second, conns: 3})
	if _, err := wr.Write(b); err != nil {
		t.Fatal(err)
	}
	// The drain comes after both gaps: once it is here, they were read.
	select {
	case req := <-w.stop:
		if req != (stopRequest{time.Second, 3}) {
			t.Fatalf("stop request %+v", req)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the drain after the gaps was not read within 10s")
	}
	if g := w.reportGap(); g != 8*time.Millisecond {
		t.Errorf("gap %v, want 8ms (and the malformed frame ignored)", g)
	}
	if !strings.Contains(logs.String(), "bad command from primary") {
		t.Errorf("malformed gap not logged: %q", logs.String())
	}
}
