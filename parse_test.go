package defuss

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/binary"
	"io"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// h2Preface is the HTTP/2 client connection preface (RFC 9113 section 3.4).
// golang.org/x/net/http2 is not a dependency, so it is spelled out here.
const h2Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

// writeRequest returns the bytes net/http sends for a request built with
// http.NewRequest and written with Request.Write. hdr holds name, value
// pairs added with Header.Add.
func writeRequest(tb testing.TB, method, url, body string, hdr ...string) []byte {
	tb.Helper()
	return writeWith(tb, (*http.Request).Write, method, url, body, hdr...)
}

// proxyRequest is like writeRequest but uses Request.WriteProxy, which sends
// the absolute-form target a client sends to a proxy.
func proxyRequest(tb testing.TB, method, url, body string, hdr ...string) []byte {
	tb.Helper()
	return writeWith(tb, (*http.Request).WriteProxy, method, url, body, hdr...)
}

func writeWith(tb testing.TB, write func(*http.Request, io.Writer) error, method, url, body string, hdr ...string) []byte {
	tb.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		tb.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Add(hdr[i], hdr[i+1])
	}
	var buf bytes.Buffer
	if err := write(req, &buf); err != nil {
		tb.Fatal(err)
	}
	return buf.Bytes()
}

// insertLines returns req with raw lines added at the end of its head, for
// fixtures net/http refuses to write (duplicate Host, malformed lines).
func insertLines(req []byte, lines ...string) []byte {
	i := bytes.Index(req, []byte("\r\n\r\n")) + 2
	var out []byte
	out = append(out, req[:i]...)
	for _, l := range lines {
		out = append(out, l...)
		out = append(out, "\r\n"...)
	}
	return append(out, req[i:]...)
}

// clientHello returns the first TLS record a crypto/tls client writes: its
// ClientHello. The handshake runs over net.Pipe and is torn down, and its
// goroutine waited for, before clientHello returns.
func clientHello(tb testing.TB) []byte {
	tb.Helper()
	client, server := net.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		// Fails once the pipe is closed below; only the bytes matter.
		_ = tls.Client(client, &tls.Config{ServerName: "example.com"}).Handshake()
	}()
	defer func() {
		server.Close()
		client.Close()
		<-done
	}()

	rec := make([]byte, 5) // type, version, length
	if _, err := io.ReadFull(server, rec); err != nil {
		tb.Fatal(err)
	}
	n := int(binary.BigEndian.Uint16(rec[3:5]))
	rec = append(rec, make([]byte, n)...)
	if _, err := io.ReadFull(server, rec[5:]); err != nil {
		tb.Fatal(err)
	}
	if rec[0] != 22 { // handshake
		tb.Fatalf("first TLS record has type %d, want 22 (handshake)", rec[0])
	}
	return rec
}

// browserGET is a typical browser navigation request with 11 header lines.
func browserGET(tb testing.TB) []byte {
	tb.Helper()
	return writeRequest(tb, http.MethodGet, "http://shop.example.com/catalog/items?page=2&sort=price", "",
		"Connection", "keep-alive",
		"Sec-Ch-Ua", `"Chromium";v="131", "Not_A Brand";v="24"`,
		"Sec-Ch-Ua-Mobile", "?0",
		"Upgrade-Insecure-Requests", "1",
		"Accept", "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8",
		"Sec-Fetch-Site", "same-origin",
		"Sec-Fetch-Mode", "navigate",
		"Accept-Encoding", "gzip, deflate, br, zstd",
		"Accept-Language", "en-US,en;q=0.9",
		"Cookie", "session=3f2a9c; theme=dark",
	)
}

func TestHeadEnd(t *testing.T) {
	const get = "GET / HTTP/1.1\r\nHost: a\r\n\r\n"
	tests := []struct {
		name string
		b    string
		from int
		want int
	}{
		{"empty", "", 0, -1},
		{"none", "GET / HTTP/1.1\r\nHost: a\r\n", 0, -1},
		{"request line only", "GET / HTTP/1.1\r\n\r\n", 0, 18},
		{"crlf", get, 0, len(get)},
		{"body after head", get + "x\r\n\r\ny", 0, len(get)},
		{"bare LF", "GET / HTTP/1.1\nHost: a\n\n", 0, 24},
		{"LF then CRLF", "GET / HTTP/1.1\nHost: a\n\r\n", 0, 25},
		{"CRLF then LF", "GET / HTTP/1.1\r\nHost: a\r\n\nbody", 0, 26},
		{"bare LF before CRLFCRLF wins", "GET / HTTP/1.1\n\nHost: a\r\n\r\n", 0, 16},
		{"CR CR is not an end", "GET / HTTP/1.1\r\r\n", 0, -1},
		{"straddle after first CR", get, len(get) - 3, len(get)},
		{"straddle after first LF", get, len(get) - 2, len(get)},
		{"straddle after second CR", get, len(get) - 1, len(get)},
		{"straddle bare LF", "GET / HTTP/1.1\nHost: a\n\n", 23, 24},
		{"from past end", get, 100, -1},
		{"negative from", get, -5, len(get)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := headEnd([]byte(tt.b), tt.from); got != tt.want {
				t.Errorf("headEnd(%q, %d) = %d, want %d", tt.b, tt.from, got, tt.want)
			}
		})
	}
}

// TestHeadEndSplitReads checks every way a head can arrive in two reads:
// when the first read did not hold a complete head, the call after the
// second read must find the same end as one call over all of it.
func TestHeadEndSplitReads(t *testing.T) {
	heads := []string{
		"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody",
		"GET / HTTP/1.1\nHost: a\n\nbody",
		"GET / HTTP/1.1\nHost: a\n\r\nbody",
		"GET / HTTP/1.1\r\nHost: a\r\n\nbody",
		"\n\n",
		"\r\n\r\n",
	}
	for _, h := range heads {
		b := []byte(h)
		want := headEnd(b, 0)
		if want < 0 {
			t.Fatalf("headEnd(%q, 0) = -1", h)
		}
		for k := 0; k <= len(b); k++ {
			if headEnd(b[:k], 0) >= 0 {
				continue // the sniffer would have stopped after the first read
			}
			if got := headEnd(b, k); got != want {
				t.Errorf("%q read as %d+%d bytes: headEnd = %d, want %d", h, k, len(b)-k, got, want)
			}
		}
	}
}

func TestParseRequest(t *testing.T) {
	get := writeRequest(t, http.MethodGet, "http://example.com/search?q=go&lang=en", "")
	post := writeRequest(t, http.MethodPost, "http://example.com/form", "a=1\r\nHost: evil\r\n\r\n")
	postHead := bytes.Index(post, []byte("\r\n\r\n")) + 4
	// An incomplete head: the request line, complete header lines and
	// the start of one more, as when the byte cap or the timeout hits.
	incomplete := insertLines(get, "X-Partial: abc")
	incomplete = incomplete[:bytes.Index(incomplete, []byte("X-Partial"))+len("X-Part")]
	badIncomplete := insertLines(get, "X-Bad : v", "X-Partial: abc")
	badIncomplete = badIncomplete[:bytes.Index(badIncomplete, []byte("X-Partial"))+len("X-Part")]
	// A URL whose Opaque is "*" makes net/http write "OPTIONS * HTTP/1.1".
	options, err := http.NewRequest(http.MethodOptions, "http://example.com", nil)
	if err != nil {
		t.Fatal(err)
	}
	options.URL.Opaque = "*"
	var buf bytes.Buffer
	if err := options.Write(&buf); err != nil {
		t.Fatal(err)
	}
	optionsStar := buf.Bytes()

	// fields are the exported fields a case expects.
	type fields struct{ Method, Path, Version, Host, Protocol string }
	unknown := fields{Protocol: ProtocolUnknown}
	const unchecked = -1
	tests := []struct {
		name   string
		in     []byte
		want   fields
		head   int                 // len(Head); 0 means all of the input
		values map[string][]string // checked with Values and Header
	}{
		{
			name:   "GET with query",
			in:     get,
			want:   fields{"GET", "/search?q=go&lang=en", "1.1", "example.com", ProtocolHTTP1},
			values: map[string][]string{"User-Agent": {"Go-http-client/1.1"}, "Accept": nil},
		},
		{
			name: "absolute-form",
			in:   proxyRequest(t, http.MethodGet, "http://example.com:8080/a?b=c", ""),
			want: fields{"GET", "http://example.com:8080/a?b=c", "1.1", "example.com:8080", ProtocolHTTP1},
		},
		{
			name: "HTTP/1.0",
			in:   bytes.Replace(get, []byte(" HTTP/1.1\r\n"), []byte(" HTTP/1.0\r\n"), 1),
			want: fields{"GET", "/search?q=go&lang=en", "1.0", "example.com", ProtocolHTTP1},
		},
		{
			// Reference defect 6: a body line could override Host.
			name:   "Host line in body does not override",
			in:     post,
			want:   fields{"POST", "/form", "1.1", "example.com", ProtocolHTTP1},
			head:   postHead,
			values: map[string][]string{"Host": {"example.com"}, "Content-Length": {"19"}},
		},
		{
			// Reference defect 6: the last duplicate used to win.
			name:   "duplicate Host first wins",
			in:     insertLines(get, "Host: second.example"),
			want:   fields{"GET", "/search?q=go&lang=en", "1.1", "example.com", ProtocolHTTP1},
			values: map[string][]string{"Host": {"example.com", "second.example"}},
		},
		{
			name: "header names are case-insensitive",
			in:   insertLines(bytes.Replace(get, []byte("Host: "), []byte("hOST: "), 1), "x-request-id: 7", "X-REQUEST-ID: 8"),
			want: fields{"GET", "/search?q=go&lang=en", "1.1", "example.com", ProtocolHTTP1},
			values: map[string][]string{
				"host":         {"example.com"},
				"X-Request-Id": {"7", "8"},
				"x-request-ID": {"7", "8"},
			},
		},
		{
			name:   "values are trimmed",
			in:     insertLines(get, "X-Pad:\t  v w \t", "X-Empty:"),
			want:   fields{"GET", "/search?q=go&lang=en", "1.1", "example.com", ProtocolHTTP1},
			values: map[string][]string{"X-Pad": {"v w"}, "X-Empty": {""}},
		},
		{
			name: "OPTIONS asterisk-form",
			in:   optionsStar,
			want: fields{"OPTIONS", "*", "1.1", "example.com", ProtocolHTTP1},
		},
		{
			// Reference defect 6: "Name : value" was accepted.
			name: "space before colon",
			in:   insertLines(get, "X-Bad : v"),
			want: unknown,
		},
		{
			name: "obs-fold",
			in:   insertLines(get, "X-Folded: a", " b"),
			want: unknown,
		},
		{
			name: "obs-fold on the first header line",
			in:   bytes.Replace(get, []byte("\r\nHost"), []byte("\r\n\tHost"), 1),
			want: unknown,
		},
		{
			name: "NUL in header value",
			in:   insertLines(get, "X-Nul: a\x00b"),
			want: unknown,
		},
		{
			name: "NUL in request target",
			in:   bytes.Replace(get, []byte("/search"), []byte("/sea\x00rch"), 1),
			want: unknown,
		},
		{
			name: "DEL in header value",
			in:   insertLines(get, "X-Del: a\x7f"),
			want: unknown,
		},
		{
			name: "empty header name",
			in:   insertLines(get, ": v"),
			want: unknown,
		},
		{
			name: "double space in request line",
			in:   bytes.Replace(get, []byte("GET "), []byte("GET  "), 1),
			want: unknown,
		},
		{
			name: "lower-case version",
			in:   bytes.Replace(get, []byte("HTTP/1.1"), []byte("http/1.1"), 1),
			want: unknown,
		},
		{
			// Reference defect 6: bare-LF heads made the primary wait for
			// the inspection timeout. headEnd now ends them, and they are
			// "unknown" because HTTP/1.1 lines end in CRLF.
			name: "bare-LF head",
			in:   bytes.ReplaceAll(get, []byte("\r\n"), []byte("\n")),
			want: unknown,
		},
		{
			name: "CRLF lines ended by a bare-LF blank line",
			in:   slices.Concat(get[:len(get)-len("\r\n")], []byte("\n")),
			want: unknown,
		},
		{
			name:   "incomplete head",
			in:     incomplete,
			want:   fields{"GET", "/search?q=go&lang=en", "1.1", "example.com", ProtocolHTTP1},
			values: map[string][]string{"X-Partial": nil, "User-Agent": {"Go-http-client/1.1"}},
		},
		{
			name: "incomplete head with malformed complete line",
			in:   badIncomplete,
			want: unknown,
		},
		{
			name: "incomplete request line",
			in:   get[:len("GET /sea")],
			want: unknown,
		},
		{
			name: "request line without its LF",
			in:   get[:bytes.IndexByte(get, '\n')],
			want: unknown,
		},
		{
			name: "TLS ClientHello",
			in:   clientHello(t),
			want: unknown,
			head: unchecked, // random bytes in the hello may happen to hold "\n\n"
		},
		{
			name: "HTTP/2 preface",
			in:   []byte(h2Preface),
			want: unknown,
			head: len("PRI * HTTP/2.0\r\n\r\n"),
		},
		{
			name: "empty input",
			in:   nil,
			want: unknown,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			remote := netip.MustParseAddrPort("192.0.2.7:40000")
			r := Request{RemoteAddr: remote}
			parseRequest(&r, tt.in)

			got := fields{r.Method, r.Path, r.Version, r.Host, r.Protocol}
			if got != tt.want {
				t.Errorf("parseRequest(%q)\n got %+v\nwant %+v", tt.in, got, tt.want)
			}
			switch {
			case tt.head == 0 && !bytes.Equal(r.Head, tt.in):
				t.Errorf("Head = %q, want all of the input", r.Head)
			case tt.head > 0 && !bytes.Equal(r.Head, tt.in[:tt.head]):
				t.Errorf("Head = %q, want %q", r.Head, tt.in[:tt.head])
			}
			if r.RemoteAddr != remote {
				t.Errorf("RemoteAddr = %v, want it untouched (%v)", r.RemoteAddr, remote)
			}
			if r.Protocol == ProtocolUnknown {
				if r.headers != nil {
					t.Errorf("headers = %q, want nil", r.headers)
				}
				if h := r.Header("Host"); h != "" {
					t.Errorf(`Header("Host") = %q, want ""`, h)
				}
			}
			for name, want := range tt.values {
				if got := r.Values(name); !slices.Equal(got, want) {
					t.Errorf("Values(%q) = %q, want %q", name, got, want)
				}
				wantFirst := ""
				if len(want) > 0 {
					wantFirst = want[0]
				}
				if got := r.Header(name); got != wantFirst {
					t.Errorf("Header(%q) = %q, want %q", name, got, wantFirst)
				}
			}
		})
	}
}

func TestParseRequestHeaders(t *testing.T) {
	in := insertLines(writeRequest(t, http.MethodGet, "http://example.com/", "", "Accept", "text/html"),
		"host: second.example", "ACCEPT: */*")
	var r Request
	parseRequest(&r, in)
	want := map[string][]string{
		"host":       {"example.com", "second.example"},
		"user-agent": {"Go-http-client/1.1"},
		"accept":     {"text/html", "*/*"},
	}
	if got := r.Headers(); !maps.EqualFunc(got, want, slices.Equal) {
		t.Errorf("Headers() = %q, want %q", got, want)
	}

	parseRequest(&r, []byte(h2Preface))
	if got := r.Headers(); len(got) != 0 {
		t.Errorf("Headers() of the HTTP/2 preface = %q, want empty", got)
	}
}

func TestParseRequestReset(t *testing.T) {
	r := Request{RemoteAddr: netip.MustParseAddrPort("192.0.2.7:40000")}
	parseRequest(&r, writeRequest(t, http.MethodGet, "http://example.com/", ""))
	r.reset()
	if r.Method != "" || r.Path != "" || r.Version != "" || r.Host != "" || r.Protocol != "" ||
		r.RemoteAddr.IsValid() || r.Head != nil || r.headers != nil {
		t.Errorf("after reset: %+v, want the zero Request but for the strings kept to reuse", r)
	}
	if r.lastPath != "/" || r.lastHost != "example.com" {
		t.Errorf("after reset: the strings kept to reuse are %q and %q; want the last head's", r.lastPath, r.lastHost)
	}
}

// TestParseRequestAllocs checks that routing a typical request allocates
// only the strings it must: Path and Host, into a new Request (common
// methods and "1.1" are constants); TestParseRequestReusesStrings has a
// pooled one, which reuses them.
func TestParseRequestAllocs(t *testing.T) {
	in := browserGET(t)
	var r Request
	if n := testing.AllocsPerRun(100, func() { r = Request{}; parseRequest(&r, in) }); n > 2 {
		t.Errorf("parseRequest allocates %v times, want at most 2", n)
	}
	if n := testing.AllocsPerRun(100, func() { _ = r.Header("sec-fetch-mode") }); n > 1 {
		t.Errorf("Header allocates %v times, want at most 1 (the result)", n)
	}
	if n := testing.AllocsPerRun(100, func() { _ = r.Header("X-Absent") }); n != 0 {
		t.Errorf("Header of an absent field allocates %v times, want 0", n)
	}
	if n := testing.AllocsPerRun(100, func() { _ = headEnd(in, 0) }); n != 0 {
		t.Errorf("headEnd allocates %v times, want 0", n)
	}
}

// TestParseTokenChars checks the tchar bit sets against RFC 9110's list.
func TestParseTokenChars(t *testing.T) {
	const tchar = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
	for c := range 256 {
		if got, want := isTchar(byte(c)), strings.IndexByte(tchar, byte(c)) >= 0; got != want {
			t.Errorf("isTchar(%q) = %v, want %v", byte(c), got, want)
		}
	}
}

// The rules of parseRequest restated as regular expressions over one line
// without its CRLF, for the fuzz test's spec oracle (RFC 9112 sections 3
// and 5, RFC 9110 section 5.6.2 for tchar).
var (
	specRequestLine = regexp.MustCompile("^([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([^\\x00-\\x20\\x7f]+) HTTP/(1\\.[0-9])$")
	specHeaderLine  = regexp.MustCompile("^([!#$%&'*+.^_`|~0-9A-Za-z-]+):([^\\x00-\\x08\\x0a-\\x1f\\x7f]*)$")
)

// specRequest is what parseRequest should make of b, computed from the rules
// with the strings and regexp packages instead of the byte scanning in
// parse.go.
type specRequest struct {
	head                        string // the head: up to the first blank line, or all of b
	complete                    bool   // whether head ends in a blank line
	http1                       bool
	method, path, version, host string
	names, values               []string // header lines in order
}

func specParse(b []byte) specRequest {
	s := string(b)
	sp := specRequest{head: s}
	// The head ends at the first "\n\n" or "\n\r\n"; whichever starts first
	// also ends first, as the two cannot overlap at the same '\n'.
	for _, term := range []string{"\n\n", "\n\r\n"} {
		if i := strings.Index(s, term); i >= 0 && (!sp.complete || i+len(term) < len(sp.head)) {
			sp.head, sp.complete = s[:i+len(term)], true
		}
	}

	// Complete lines are those ending in '\n'; a trailing partial line of an
	// incomplete head is ignored. All of them must end in CRLF.
	var lines []string
	if sp.complete {
		body, ok := strings.CutSuffix(sp.head, "\r\n\r\n")
		if !ok {
			return sp // ends in a bare-LF blank line
		}
		lines = strings.Split(body, "\r\n")
	} else {
		i := strings.LastIndexByte(s, '\n')
		if i < 0 {
			return sp // not even the request line is complete
		}
		body, ok := strings.CutSuffix(s[:i+1], "\r\n")
		if !ok {
			return sp
		}
		lines = strings.Split(body, "\r\n")
	}

	m := specRequestLine.FindStringSubmatch(lines[0])
	if m == nil {
		return sp
	}
	for _, l := range lines[1:] {
		h := specHeaderLine.FindStringSubmatch(l)
		if h == nil {
			return specRequest{head: sp.head, complete: sp.complete}
		}
		sp.names = append(sp.names, h[1])
		sp.values = append(sp.values, strings.Trim(h[2], " \t"))
	}
	sp.http1 = true
	sp.method, sp.path, sp.version = m[1], m[2], m[3]
	if i := slices.IndexFunc(sp.names, func(n string) bool { return strings.EqualFold(n, "Host") }); i >= 0 {
		sp.host = sp.values[i]
	}
	return sp
}

// FuzzParseRequest checks parseRequest and headEnd against a restatement of
// the rules (specParse) and against net/http's http.ReadRequest.
//
// Known disagreements with net/http, where net/http accepts a head we call
// "unknown"; RFC 9112 allows or requires us to reject each of them, and for
// routing, rejecting is the safe side:
//   - "Name : value": net/http accepts whitespace before the colon for
//     compatibility (go.dev/issue/34540), keeping "Host " as a separate
//     field; RFC 9112 section 5.1 says a server MUST reject it.
//   - obs-fold continuation lines: net/http joins them; RFC 9112 section 5.2
//     lets a server reject them.
//   - bare-LF line ends: net/http accepts them; RFC 9112 section 2.2 says a
//     recipient MAY, so it need not.
//   - "PRI * HTTP/2.0": net/http parses the HTTP/2 preface as a request so
//     that a server can handle h2c; it is not HTTP/1.x.
//
// The other way round, we call some heads "http1" that http.ReadRequest
// rejects: a target that is none of the four forms of RFC 9112 section 3.2
// ("GET a HTTP/1.1"), an invalid Content-Length, and more than one Host
// header, which RFC 9112 section 3.2 says a server MUST answer with 400.
// Routing does not need those checks (for duplicate Hosts the first wins and
// [Request.Values] shows all); the worker's server answers with the 400.
func FuzzParseRequest(f *testing.F) {
	// Requests as net/http writes them: origin-form with a query, a POST
	// whose body holds a Host line, absolute-form to a proxy.
	f.Add(writeRequest(f, http.MethodGet, "http://example.com/search?q=go&lang=en", ""))
	f.Add(writeRequest(f, http.MethodPost, "http://example.com/form", "a=1\r\nHost: evil\r\n\r\n"))
	f.Add(proxyRequest(f, http.MethodGet, "http://example.com:8080/a?b=c", ""))
	// A browser-like GET with many header lines.
	f.Add(browserGET(f))
	// Duplicate Host headers, in different case.
	f.Add(insertLines(writeRequest(f, http.MethodGet, "http://example.com/", ""), "host: second.example"))
	// Whitespace before the colon, and an obs-fold line.
	f.Add(insertLines(writeRequest(f, http.MethodGet, "http://example.com/", ""), "X-Bad : v"))
	f.Add(insertLines(writeRequest(f, http.MethodGet, "http://example.com/", ""), "X-Folded: a", " b"))
	// A bare-LF head.
	f.Add([]byte("GET / HTTP/1.1\nHost: example.com\n\n"))
	// An incomplete head cut in the middle of a header line.
	f.Add([]byte("GET / HTTP/1.1\r\nHost: example.com\r\nUser-Ag"))
	// CONNECT in authority-form, where net/http takes Host from the target.
	f.Add([]byte("CONNECT example.com:443 HTTP/1.1\r\nHost: other.example\r\n\r\n"))
	// A real TLS ClientHello from crypto/tls.
	f.Add(clientHello(f))
	// The HTTP/2 client connection preface.
	f.Add([]byte(h2Preface))
	// Nothing at all.
	f.Add([]byte{})

	f.Fuzz(func(t *testing.T, b []byte) {
		orig := bytes.Clone(b)
		var r Request
		parseRequest(&r, b)
		if !bytes.Equal(b, orig) {
			t.Fatalf("parseRequest modified its input")
		}

		// Head is a prefix of the input, aliasing it, and agrees with headEnd.
		if !bytes.HasPrefix(b, r.Head) || len(r.Head) > 0 && &r.Head[0] != &b[0] {
			t.Fatalf("Head %q is not a prefix of the input", r.Head)
		}
		n := headEnd(b, 0)
		if n >= 0 && len(r.Head) != n || n < 0 && len(r.Head) != len(b) {
			t.Fatalf("headEnd = %d but len(Head) = %d of %d", n, len(r.Head), len(b))
		}

		// However the bytes are split into reads, headEnd finds the same end.
		for step := 1; step <= 3; step++ {
			got := -1
			for prev, end := 0, min(step, len(b)); ; prev, end = end, min(end+step, len(b)) {
				if got = headEnd(b[:end], prev); got >= 0 || end == len(b) {
					break
				}
			}
			if got != n {
				t.Fatalf("headEnd over reads of %d bytes = %d, want %d", step, got, n)
			}
		}

		switch r.Protocol {
		case ProtocolHTTP1:
			if r.Method == "" || r.Path == "" || r.Version == "" {
				t.Fatalf("http1 with empty fields: %+v", r)
			}
		case ProtocolUnknown:
			if r.Method != "" || r.Path != "" || r.Version != "" || r.Host != "" || r.headers != nil {
				t.Fatalf("unknown with fields set: %+v", r)
			}
		default:
			t.Fatalf("Protocol = %q", r.Protocol)
		}

		// The spec oracle.
		sp := specParse(b)
		if sp.head != string(r.Head) {
			t.Fatalf("Head = %q, spec says %q", r.Head, sp.head)
		}
		if got := r.Protocol == ProtocolHTTP1; got != sp.http1 {
			t.Fatalf("Protocol = %q, spec says http1 = %v", r.Protocol, sp.http1)
		}
		if r.Method != sp.method || r.Path != sp.path || r.Version != sp.version || r.Host != sp.host {
			t.Fatalf("got %q %q %q host %q, spec says %q %q %q host %q",
				r.Method, r.Path, r.Version, r.Host, sp.method, sp.path, sp.version, sp.host)
		}
		hs := r.Headers()
		total := 0
		for _, name := range sp.names {
			want := []string{}
			for j := range sp.names {
				if strings.EqualFold(sp.names[j], name) {
					want = append(want, sp.values[j])
				}
			}
			if got := r.Values(name); !slices.Equal(got, want) {
				t.Fatalf("Values(%q) = %q, spec says %q", name, got, want)
			}
			if got := r.Header(name); got != want[0] {
				t.Fatalf("Header(%q) = %q, spec says %q", name, got, want[0])
			}
			if got := hs[strings.ToLower(name)]; !slices.Equal(got, want) {
				t.Fatalf("Headers()[%q] = %q, spec says %q", strings.ToLower(name), got, want)
			}
		}
		for _, vs := range hs {
			total += len(vs)
		}
		if total != len(sp.names) {
			t.Fatalf("Headers() holds %d values, spec says %d", total, len(sp.names))
		}

		// The net/http oracle, for complete heads.
		if n < 0 {
			return
		}
		req, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(r.Head)))
		if err != nil {
			return // net/http is stricter about targets and some fields
		}
		if r.Protocol != ProtocolHTTP1 {
			// net/http accepts it. That is fine only for the disagreements
			// listed above, all of which break the rules specParse checks:
			// a head that is CRLF-only and well-formed must be http1. (This
			// repeats the spec check above with net/http as the witness.)
			if sp.http1 {
				t.Fatalf("net/http reads %q as %s %s %s, we say %q", r.Head, req.Method, req.RequestURI, req.Proto, r.Protocol)
			}
			return
		}
		if req.Method != r.Method || req.RequestURI != r.Path || req.Proto != "HTTP/"+r.Version {
			t.Fatalf("net/http reads %q %q %q, we read %q %q %q",
				req.Method, req.RequestURI, req.Proto, r.Method, r.Path, "HTTP/"+r.Version)
		}
		// For absolute-form and CONNECT authority-form targets net/http takes
		// Host from the target (RFC 9112 section 3.2.2), so compare only when
		// the target names no host. ReadRequest fails on more than one Host
		// header, so here there is at most one.
		if req.URL.Host == "" && req.Host != r.Host {
			t.Fatalf("net/http reads Host %q, we read %q", req.Host, r.Host)
		}
	})
}

// A pooled Request parses the same target and Host again without
// allocating, and a different one into a string of its own: a string
// given out before is never changed.
func TestParseRequestReusesStrings(t *testing.T) {
	head := func(path, host string) []byte {
		return []byte("GET " + path + " HTTP/1.1\r\nHost: " + host + "\r\n\r\n")
	}
	var r Request
	a := head("/a?x=1", "example.com")
	parseRequest(&r, a)
	path, host := r.Path, r.Host
	r.reset() // as the pool's Put does
	if n := testing.AllocsPerRun(100, func() { parseRequest(&r, a) }); n != 0 {
		t.Errorf("parsing the same head again made %v allocations; want 0", n)
	}
	long := "/" + strings.Repeat("l", reuseMax)
	parseRequest(&r, head(long, "example.com"))
	if r.Path != long || r.lastPath != "" || r.lastHost != "example.com" {
		t.Errorf("a target longer than %d bytes: Path %d bytes, %d kept to reuse; want it given, none kept", reuseMax, len(r.Path), len(r.lastPath))
	}
	b := head("/b", "example.org")
	a[4], a[len(a)-6] = 'z', 'z' // the buffer is reused: its old bytes change
	parseRequest(&r, b)
	if r.Path != "/b" || r.Host != "example.org" {
		t.Errorf("after another head: Path %q, Host %q; want \"/b\", \"example.org\"", r.Path, r.Host)
	}
	if path != "/a?x=1" || host != "example.com" {
		t.Errorf("a string given out earlier changed: Path %q, Host %q", path, host)
	}
	parseRequest(&r, head("/b", "example.com"))
	if r.Path != "/b" || r.Host != "example.com" {
		t.Errorf("Path %q, Host %q; want \"/b\", \"example.com\"", r.Path, r.Host)
	}
}

func BenchmarkParseRequest(b *testing.B) {
	in := browserGET(b)
	b.SetBytes(int64(len(in)))
	b.ReportAllocs()
	var r Request
	for b.Loop() {
		parseRequest(&r, in)
	}
	if r.Protocol != ProtocolHTTP1 {
		b.Fatalf("Protocol = %q", r.Protocol)
	}
}

func BenchmarkHeadEnd(b *testing.B) {
	in := browserGET(b)
	b.SetBytes(int64(len(in)))
	b.ReportAllocs()
	for b.Loop() {
		if headEnd(in, 0) != len(in) {
			b.Fatal("no head end")
		}
	}
}
