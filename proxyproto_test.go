package defuss

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"testing"

	"github.com/pires/go-proxyproto"
)

// workerHeaderSeeds are headers as a primary writes them: IPv4, IPv6, an
// IPv4 client on an IPv6 listener, and LOCAL (addresses unknown).
func workerHeaderSeeds(secret *[secretLen]byte) map[string][]byte {
	v4 := netip.MustParseAddrPort("192.0.2.1:40000")
	v4dst := netip.MustParseAddrPort("127.0.0.1:3000")
	v6 := netip.MustParseAddrPort("[2001:db8::7]:65535")
	v6dst := netip.MustParseAddrPort("[::1]:443")
	return map[string][]byte{
		"IPv4":         appendProxyV2(nil, v4, v4dst, secret),
		"IPv6":         appendProxyV2(nil, v6, v6dst, secret),
		"IPv4 on IPv6": appendProxyV2(nil, v4, v6dst, secret),
		"LOCAL":        appendProxyV2(nil, netip.AddrPort{}, v4dst, secret),
	}
}

// decodeWorkerHeader reads what appendProxyV2 writes, and what
// go-proxyproto reads from it; it wants more bytes for every prefix of
// it, and reports the header's length with bytes after it.
func TestDecodeWorkerHeader(t *testing.T) {
	secret := fixtureSecret()
	for name, hdr := range workerHeaderSeeds(&secret) {
		t.Run(name, func(t *testing.T) {
			want := proxyprotoHeader(t, hdr)
			for k := range len(hdr) {
				if _, n, err := decodeWorkerHeader(hdr[:k], &secret); n != 0 || err != nil {
					t.Fatalf("a prefix of %d bytes: %d, %v; want 0 (read more)", k, n, err)
				}
			}
			h, n, err := decodeWorkerHeader(append(bytes.Clone(hdr), "GET / HTTP/1.1\r\n"...), &secret)
			if err != nil || n != len(hdr) {
				t.Fatalf("%d, %v; want %d", n, err, len(hdr))
			}
			if h != want {
				t.Errorf("decoded %+v; go-proxyproto reads %+v", h, want)
			}
		})
	}
}

// proxyprotoHeader is what go-proxyproto reads from hdr, as a workerHeader.
func proxyprotoHeader(t testing.TB, hdr []byte) workerHeader {
	t.Helper()
	h, err := proxyproto.Read(bufio.NewReader(bytes.NewReader(hdr)))
	if err != nil {
		t.Fatalf("go-proxyproto: %v", err)
	}
	var w workerHeader
	if h.Command.IsProxy() {
		w.src = h.SourceAddr.(*net.TCPAddr).AddrPort()
		w.dst = h.DestinationAddr.(*net.TCPAddr).AddrPort()
		w.src = netip.AddrPortFrom(w.src.Addr().Unmap(), w.src.Port())
		w.dst = netip.AddrPortFrom(w.dst.Addr().Unmap(), w.dst.Port())
	}
	return w
}

// Anything but a primary's header is refused, with errNotFromPrimary: a
// worker serves no such connection.
func TestDecodeWorkerHeaderRefuses(t *testing.T) {
	secret := fixtureSecret()
	good := workerHeaderSeeds(&secret)["IPv4"]
	tlvAt := len(good) - 3 - secretLen
	with := func(i int, b byte) []byte {
		h := bytes.Clone(good)
		h[i] = b
		return h
	}
	withLen := func(n int) []byte {
		h := bytes.Clone(good)
		binary.BigEndian.PutUint16(h[14:16], uint16(n))
		return h
	}
	wrong := secret
	wrong[0] ^= 1
	other := []byte{0x04, 0x00, 0x02, 'h', '2'} // another TLV (ALPN), before the secret's
	withOther := append(append(bytes.Clone(good[:tlvAt]), other...), good[tlvAt:]...)
	binary.BigEndian.PutUint16(withOther[14:16], uint16(len(withOther)-16))
	if _, n, err := decodeWorkerHeader(withOther, &secret); err != nil || n != len(withOther) {
		t.Errorf("another TLV before the secret: %d, %v; want it read", n, err)
	}
	for _, tc := range []struct {
		name string
		b    []byte
	}{
		{"a request", []byte("GET / HTTP/1.1\r\nHost: t\r\n\r\n")},
		{"PROXY v1", []byte("PROXY TCP4 203.0.113.9 127.0.0.1 4444 3000\r\n")},
		{"one byte", []byte{'G'}},
		{"a wrong signature", with(11, 0x0B)},
		{"version 1", with(12, 0x11)},
		{"command 2", with(12, 0x22)},
		{"UDP over IPv4", with(13, 0x12)},
		{"a Unix socket", with(13, 0x31)},
		{"LOCAL with IPv4", with(12, 0x20)},
		{"PROXY without addresses", with(13, 0x00)},
		{"longer than a primary's", withLen(proxyV2Max - 16 + 1)},
		{"too short for its addresses", withLen(11)},
		{"a TLV cut short", withLen(len(good) - 16 - 1)},
		{"a TLV's length past the header", with(tlvAt+2, secretLen+1)},
		{"two bytes of a TLV", withLen(12 + 2)},
		{"no TLV", withLen(12)},
		{"a secret of another type", with(tlvAt, tlvSecret+1)},
		{"a wrong secret", appendProxyV2(nil, netip.MustParseAddrPort("192.0.2.1:1"), netip.MustParseAddrPort("127.0.0.1:2"), &wrong)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, n, err := decodeWorkerHeader(tc.b, &secret); !errors.Is(err, errNotFromPrimary) || n != 0 {
				t.Errorf("%d, %v; want errNotFromPrimary", n, err)
			}
		})
	}
	// A secret of another length: its bytes are the secret's, and one more.
	long := append(bytes.Clone(good[:tlvAt]), tlvSecret, 0, secretLen+1)
	long = append(append(long, secret[:]...), 0)
	binary.BigEndian.PutUint16(long[14:16], uint16(len(long)-16))
	if _, _, err := decodeWorkerHeader(long, &secret); !errors.Is(err, errNotFromPrimary) {
		t.Errorf("a secret one byte longer: %v; want errNotFromPrimary", err)
	}
}

// FuzzDecodeWorkerHeader: no input makes decodeWorkerHeader panic or
// report a length past its input; what it accepts, go-proxyproto reads
// the same, and it carries the secret.
func FuzzDecodeWorkerHeader(f *testing.F) {
	secret := fixtureSecret()
	for _, h := range workerHeaderSeeds(&secret) {
		f.Add(h)
		f.Add(append(bytes.Clone(h), "GET / HTTP/1.1\r\n\r\n"...))
	}
	f.Add([]byte("PROXY TCP4 203.0.113.9 127.0.0.1 4444 3000\r\n"))
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, n, err := decodeWorkerHeader(b, &secret)
		switch {
		case err != nil:
			if n != 0 || !errors.Is(err, errNotFromPrimary) {
				t.Fatalf("%d, %v: an error must be errNotFromPrimary, with no length", n, err)
			}
			return
		case n == 0:
			if len(b) >= proxyV2Max {
				t.Fatalf("wants more than %d bytes", len(b))
			}
			return
		case n > len(b) || n > proxyV2Max:
			t.Fatalf("a header of %d bytes in %d", n, len(b))
		}
		hdr := b[:n]
		if !bytes.Contains(hdr, append([]byte{tlvSecret, 0, secretLen}, secret[:]...)) {
			t.Fatalf("accepted without the secret: %x", hdr)
		}
		if want := proxyprotoHeader(t, hdr); h != want {
			t.Fatalf("decoded %+v; go-proxyproto reads %+v", h, want)
		}
	})
}

// BenchmarkDecodeWorkerHeader is a worker's reading of its primary's
// header, as every spliced connection starts: no allocation.
func BenchmarkDecodeWorkerHeader(b *testing.B) {
	secret := fixtureSecret()
	hdr := append(workerHeaderSeeds(&secret)["IPv4"], "GET / HTTP/1.1\r\nHost: t\r\n\r\n"...)
	b.SetBytes(int64(len(hdr)))
	b.ReportAllocs()
	for b.Loop() {
		if _, n, err := decodeWorkerHeader(hdr, &secret); n == 0 || err != nil {
			b.Fatal(n, err)
		}
	}
}

// The decoding allocates nothing, on the path every spliced connection
// to a worker takes.
func TestDecodeWorkerHeaderAllocs(t *testing.T) {
	secret := fixtureSecret()
	hdr := workerHeaderSeeds(&secret)["IPv6"]
	if n := testing.AllocsPerRun(100, func() { decodeWorkerHeader(hdr, &secret) }); n != 0 {
		t.Errorf("decodeWorkerHeader allocates %v times; want 0", n)
	}
}
