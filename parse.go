package defuss

import (
	"bytes"
	"net/netip"
	"strings"
)

// Request is the parsed start of an HTTP/1.x request head, as sniffed by the
// primary before it picks a worker. A [Balancer] receives it for every new
// connection.
//
// A Request and the slices it holds are valid only during the Balancer call;
// a Balancer must not keep them.
type Request struct {
	// Method is the request method, such as "GET". Empty when Protocol is "unknown".
	Method string
	// Path is the request target as sent, including the query string.
	Path string
	// Version is the HTTP version from the request line, such as "1.1".
	Version string
	// Host is the value of the first Host header, trimmed.
	Host string
	// Protocol is "http1" when a valid HTTP/1.x request line and well-formed
	// header lines were read; "tls" for a TLS ClientHello (the primary does
	// not terminate TLS: Host is then the server name the client asks for,
	// SNI, and ALPN the protocols it offers); "h2c" for the HTTP/2 preface
	// (prior knowledge); and "unknown" otherwise (malformed or binary
	// bytes, or a head that did not arrive in time). Method, Path and
	// Version are set for "http1" only.
	Protocol string
	// ALPN is the list of application protocols a TLS client offers, such
	// as "h2" and "http/1.1", when Protocol is "tls".
	ALPN []string
	// RemoteAddr is the address of the client that opened the connection.
	RemoteAddr netip.AddrPort
	// Head holds the bytes the primary read before routing: the whole head up
	// to and including the blank line when it was complete, otherwise all
	// bytes read before the timeout, the byte cap or EOF.
	Head []byte

	// headers is the region of Head holding complete, validated header lines.
	headers []byte
	// lastPath and lastHost are the strings the last parse into r made,
	// kept through reset: a head with the same target or Host gets the
	// same string, not a new one (see parseRequest).
	lastPath, lastHost string
}

// Protocol values of [Request.Protocol].
const (
	ProtocolHTTP1   = "http1"
	ProtocolTLS     = "tls"
	ProtocolH2C     = "h2c"
	ProtocolUnknown = "unknown"
)

// Header returns the first value of the header field called name, with
// surrounding spaces and tabs removed. Names are matched without regard to
// ASCII case. Header returns "" when the field is absent or Protocol is
// "unknown". Only the returned string is allocated.
func (r *Request) Header(name string) string {
	for rest := r.headers; len(rest) > 0; {
		var k, v []byte
		k, v, rest = nextHeader(rest)
		if equalFoldASCII(k, name) {
			return string(v)
		}
	}
	return ""
}

// Values returns every value of the header field called name, in the order
// they were sent, each trimmed as by [Request.Header]. Names are matched
// without regard to ASCII case. Values returns nil when the field is absent.
// A duplicate Host header, for example, shows up here even though
// [Request.Host] holds only the first.
func (r *Request) Values(name string) []string {
	var vs []string
	for rest := r.headers; len(rest) > 0; {
		var k, v []byte
		k, v, rest = nextHeader(rest)
		if equalFoldASCII(k, name) {
			vs = append(vs, string(v))
		}
	}
	return vs
}

// Headers returns all header fields as a new map from lower-case names to
// their trimmed values in the order they were sent. It allocates the map and
// every string on each call; a Balancer that needs only a few fields should
// use [Request.Header] or [Request.Values]. Headers returns an empty map when
// Protocol is "unknown".
func (r *Request) Headers() map[string][]string {
	m := make(map[string][]string)
	for rest := r.headers; len(rest) > 0; {
		var k, v []byte
		k, v, rest = nextHeader(rest)
		name := strings.ToLower(string(k))
		m[name] = append(m[name], string(v))
	}
	return m
}

// reset clears r so that it can be reused from a sync.Pool, but for the
// strings it keeps to reuse.
func (r *Request) reset() {
	*r = Request{lastPath: r.lastPath, lastHost: r.lastHost}
}

// headEnd returns the length of the request head at the start of b,
// including its terminator, or -1 if b does not yet hold a complete head.
//
// The head ends at the first blank line: the first "\r\n\r\n", or a
// bare-LF "\n\n" or "\n\r\n", whichever comes first. Bare-LF ends are
// recognised only so that such a head does not make the primary wait for
// the inspection timeout; parseRequest calls those heads "unknown".
//
// from is the length of b before the latest read; everything before it was
// already scanned by an earlier call. Scanning restarts a few bytes earlier
// because a terminator can straddle two reads. headEnd does not allocate.
func headEnd(b []byte, from int) int {
	// A terminator is a '\n' followed by "\n" or "\r\n", so it is at most
	// 3 bytes from its '\n' on. One that ended before from would have been
	// found by the earlier call, so any new one starts at from-2 or later;
	// backing up 3 (len("\r\n\r\n")-1) keeps the argument simple.
	start := min(max(from-3, 0), len(b))
	for i := start; ; {
		j := bytes.IndexByte(b[i:], '\n')
		if j < 0 {
			return -1
		}
		i += j + 1 // b[i] is the byte after the '\n'
		if i < len(b) && b[i] == '\n' {
			return i + 1
		}
		if i+1 < len(b) && b[i] == '\r' && b[i+1] == '\n' {
			return i + 2
		}
	}
}

// parseRequest parses the sniffed bytes b into r. b may hold a complete head
// followed by body bytes, or an incomplete head cut off by the inspection
// timeout, the byte cap or EOF. Body bytes are never read as headers.
//
// The request line must be complete and well-formed, and every complete
// header line must be well-formed, for r.Protocol to be "http1". A trailing
// partial line of an incomplete head is ignored. An empty line before the
// request line, which RFC 9112 section 2.2 says a server SHOULD ignore, makes
// the head "unknown", as it makes http.ReadRequest fail. r.Head aliases b.
// parseRequest does not change r.RemoteAddr and allocates only the strings
// it stores in r, and of those only a Path or a Host that differs from
// the last one parsed into r.
func parseRequest(r *Request, b []byte) {
	head := b
	if n := headEnd(b, 0); n >= 0 {
		head = b[:n]
	}
	r.Head = head
	r.Method, r.Path, r.Version, r.Host = "", "", "", ""
	r.Protocol = ProtocolUnknown
	r.headers = nil

	line, rest, ok := cutLine(head)
	if !ok {
		return // no complete request line, or it ends in a bare LF
	}
	method, target, minor, ok := parseRequestLine(line)
	if !ok {
		return
	}

	hdrStart := len(head) - len(rest)
	var host []byte
	hostSeen := false
	for {
		i := bytes.IndexByte(rest, '\n')
		if i < 0 {
			// The trailing partial line of an incomplete head, or nothing
			// at all. A complete head ends in '\n', so it never gets here
			// with bytes left over.
			break
		}
		if i == 0 || rest[i-1] != '\r' {
			return // bare LF
		}
		line := rest[:i-1]
		if len(line) == 0 {
			break // the blank line that ends a complete head
		}
		name, value, ok := parseHeaderLine(line)
		if !ok {
			return
		}
		if !hostSeen && equalFoldASCII(name, "host") {
			host, hostSeen = value, true
		}
		rest = rest[i+1:]
	}

	r.Method = methodString(method)
	r.Path = reuse(&r.lastPath, target)
	r.Version = versionString(minor)
	r.Host = reuse(&r.lastHost, host)
	r.Protocol = ProtocolHTTP1
	r.headers = head[hdrStart : len(head)-len(rest)]
}

// reuse returns b as a string: *last if it holds the same bytes, else a
// new one, which becomes *last if it is at most reuseMax bytes. A Request
// from the pool parses heads of the same client, load balancer or health
// check one after another: the same Host, often the same target, and no
// allocation for them. A longer string is not kept: pooled Requests would
// hold up to a head's worth each until the pool is next cleared.
func reuse(last *string, b []byte) string {
	if string(b) == *last { // the conversion does not allocate
		return *last
	}
	s := string(b)
	*last = ""
	if len(s) <= reuseMax {
		*last = s
	}
	return s
}

// reuseMax is the longest string a Request keeps to reuse.
const reuseMax = 256

// cutLine splits b after its first '\n'. It returns the line without its
// CRLF and the bytes after it; ok is false if b has no '\n' or the line ends
// in a bare LF (HTTP/1.1 lines end in CRLF, RFC 9112 section 2.2).
func cutLine(b []byte) (line, rest []byte, ok bool) {
	i := bytes.IndexByte(b, '\n')
	if i < 1 || b[i-1] != '\r' {
		return nil, b, false
	}
	return b[:i-1], b[i+1:], true
}

// parseRequestLine splits an HTTP/1.x request line (without its CRLF):
//
//	method SP request-target SP "HTTP/1." DIGIT
//
// The method is a token, the target is non-empty and holds no SP, CTL or
// DEL, and the separators are single spaces (RFC 9112 section 3). minor is
// the version's minor digit.
func parseRequestLine(line []byte) (method, target []byte, minor byte, ok bool) {
	i := 0
	for i < len(line) && isTchar(line[i]) {
		i++
	}
	if i == 0 || i == len(line) || line[i] != ' ' {
		return nil, nil, 0, false
	}
	method, line = line[:i], line[i+1:]

	i = 0
	for i < len(line) && line[i] > ' ' && line[i] != 0x7f {
		i++
	}
	if i == 0 || i == len(line) || line[i] != ' ' {
		return nil, nil, 0, false
	}
	target, line = line[:i], line[i+1:]

	const prefix = "HTTP/1."
	if len(line) != len(prefix)+1 || string(line[:len(prefix)]) != prefix {
		return nil, nil, 0, false
	}
	minor = line[len(prefix)]
	if minor < '0' || minor > '9' {
		return nil, nil, 0, false
	}
	return method, target, minor, true
}

// parseHeaderLine splits a header line (without its CRLF):
//
//	field-name ":" OWS field-value OWS
//
// The name is a token with no whitespace before the colon, which also rules
// out obs-fold continuation lines (RFC 9112 sections 5.1 and 5.2). The value
// holds no CTL other than HTAB; obs-text bytes are allowed. value is trimmed.
func parseHeaderLine(line []byte) (name, value []byte, ok bool) {
	i := 0
	for i < len(line) && isTchar(line[i]) {
		i++
	}
	if i == 0 || i == len(line) || line[i] != ':' {
		return nil, nil, false
	}
	for _, c := range line[i+1:] {
		if c < ' ' && c != '\t' || c == 0x7f {
			return nil, nil, false
		}
	}
	return line[:i], trimOWS(line[i+1:]), true
}

// nextHeader returns the first header of the validated region h, with its
// value trimmed, and the rest of h. It tolerates any input without
// panicking, but is meant for regions that parseRequest has validated.
func nextHeader(h []byte) (name, value, rest []byte) {
	line := h
	if i := bytes.IndexByte(h, '\n'); i >= 0 {
		line, rest = h[:i], h[i+1:]
	}
	line = bytes.TrimSuffix(line, []byte{'\r'})
	if i := bytes.IndexByte(line, ':'); i >= 0 {
		return line[:i], trimOWS(line[i+1:]), rest
	}
	return line, nil, rest
}

// trimOWS removes leading and trailing spaces and tabs.
func trimOWS(b []byte) []byte {
	for len(b) > 0 && (b[0] == ' ' || b[0] == '\t') {
		b = b[1:]
	}
	for len(b) > 0 && (b[len(b)-1] == ' ' || b[len(b)-1] == '\t') {
		b = b[:len(b)-1]
	}
	return b
}

// equalFoldASCII reports whether b and s are equal under ASCII case folding.
func equalFoldASCII(b []byte, s string) bool {
	if len(b) != len(s) {
		return false
	}
	for i := range len(b) {
		if lowerASCII(b[i]) != lowerASCII(s[i]) {
			return false
		}
	}
	return true
}

func lowerASCII(c byte) byte {
	if 'A' <= c && c <= 'Z' {
		return c + 'a' - 'A'
	}
	return c
}

// The token characters of RFC 9110 section 5.6.2 as a 128-bit set, split
// into bytes 0-63 (tcharLo) and 64-127 (tcharHi):
//
//	tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." /
//	        "^" / "_" / "`" / "|" / "~" / DIGIT / ALPHA
const (
	tcharLo uint64 = 1<<'!' | 1<<'#' | 1<<'$' | 1<<'%' | 1<<'&' | 1<<'\'' |
		1<<'*' | 1<<'+' | 1<<'-' | 1<<'.' | (1<<10-1)<<'0'
	tcharHi uint64 = (1<<26-1)<<('A'-64) | (1<<26-1)<<('a'-64) |
		1<<('^'-64) | 1<<('_'-64) | 1<<('`'-64) | 1<<('|'-64) | 1<<('~'-64)
)

// isTchar reports whether c is an RFC 9110 token character.
func isTchar(c byte) bool {
	switch {
	case c < 64:
		return tcharLo&(1<<c) != 0
	case c < 128:
		return tcharHi&(1<<(c-64)) != 0
	}
	return false
}

// methodString returns m as a string, without allocating for the common
// methods.
func methodString(m []byte) string {
	switch string(m) { // does not allocate
	case "GET":
		return "GET"
	case "HEAD":
		return "HEAD"
	case "POST":
		return "POST"
	case "PUT":
		return "PUT"
	case "DELETE":
		return "DELETE"
	case "CONNECT":
		return "CONNECT"
	case "OPTIONS":
		return "OPTIONS"
	case "TRACE":
		return "TRACE"
	case "PATCH":
		return "PATCH"
	}
	return string(m)
}

// versionString returns "1." followed by the minor digit, without
// allocating for "1.0" and "1.1".
func versionString(minor byte) string {
	switch minor {
	case '1':
		return "1.1"
	case '0':
		return "1.0"
	}
	return "1." + string(rune(minor))
}
