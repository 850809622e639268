// Command report reads the test2json output of the Kubernetes conformance runs
// (scripts/kubernetes), prints one summary line per apiserver and etcd version, writes the
// results table of docs/kubernetes.md, and fails when a test fails straight against etcd
// (the control is broken) or fails through the shim without being listed as a known
// difference.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// event is one line of `go tool test2json`.
type event struct {
	Action string
	Test   string
	Output string
}

// unitMarker is what setup logs in every test that gets an etcd of its own: the units
// compared here, at the granularity of Kubernetes' own etcd3 tests.
const unitMarker = "conformance unit:"

// run is the outcome of one test binary run: each unit's result ("pass", "fail", "skip").
type run struct {
	units map[string]string
	// finished: the binary ran to its end (a crash or time-out leaves no final event).
	finished bool
}

func readRun(path string) (*run, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	r := &run{units: map[string]string{}}
	isUnit := map[string]bool{}
	results := map[string]string{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		var e event
		if json.Unmarshal(sc.Bytes(), &e) != nil {
			continue
		}
		switch e.Action {
		case "output":
			if e.Test != "" && strings.Contains(e.Output, unitMarker) {
				isUnit[e.Test] = true
			}
		case "pass", "fail", "skip":
			if e.Test == "" {
				r.finished = true
			} else {
				results[e.Test] = e.Action
			}
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	for name := range isUnit {
		res, ok := results[name]
		if !ok {
			res = "fail" // started and never ended: the binary died in it
		}
		r.units[name] = res
	}
	return r, nil
}

// known are the differences that docs/kubernetes.md explains: unit name (or a parent of
// it) to the reason.
func readKnown(path string) (map[string]string, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return map[string]string{}, nil
	}
	if err != nil {
		return nil, err
	}
	known := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		name, reason, _ := strings.Cut(line, "\t")
		known[name] = strings.TrimSpace(reason)
	}
	return known, nil
}

func knownReason(known map[string]string, unit string) (string, bool) {
	for name, reason := range known {
		if unit == name || strings.HasPrefix(unit, name+"/") {
			return reason, true
		}
	}
	return "", false
}

// versions is a repeated name=version flag, in the order given.
type versions struct {
	names []string
	full  map[string]string
}

func (v *versions) String() string { return strings.Join(v.names, ",") }
func (v *versions) Set(s string) error {
	name, full, ok := strings.Cut(s, "=")
	if !ok {
		return fmt.Errorf("want name=version, got %q", s)
	}
	if v.full == nil {
		v.full = map[string]string{}
	}
	v.names = append(v.names, name)
	v.full[name] = full
	return nil
}

func main() {
	var apiservers, etcds versions
	results := flag.String("results", "", "directory of the runs' test2json files")
	knownPath := flag.String("known", "", "file of known differences (name TAB reason)")
	docs := flag.String("write-docs", "", "rewrite the results table of this Markdown file")
	flag.Var(&apiservers, "apiserver", "apiserver version, as name=full (repeated)")
	flag.Var(&etcds, "etcd", "etcd version, as minor=full (repeated)")
	flag.Parse()
	if err := report(*results, *knownPath, *docs, apiservers, etcds); err != nil {
		fmt.Fprintln(os.Stderr, "report:", err)
		os.Exit(1)
	}
}

func report(dir, knownPath, docs string, apiservers, etcds versions) error {
	known, err := readKnown(knownPath)
	if err != nil {
		return err
	}
	type cell struct{ direct, shim *run }
	cells := map[[2]string]cell{}
	allUnits := map[string]bool{}
	var problems []string
	for _, a := range apiservers.names {
		for _, e := range etcds.names {
			var c cell
			for _, via := range []string{"direct", "shim"} {
				path := filepath.Join(dir, fmt.Sprintf("%s-%s-%s.json", a, e, via))
				r, err := readRun(path)
				if err != nil {
					return err
				}
				if !r.finished || len(r.units) == 0 {
					problems = append(problems, fmt.Sprintf("apiserver %s, etcd %s, %s: the run did not finish (see %s)",
						a, e, via, strings.TrimSuffix(path, ".json")+".log"))
				}
				for u := range r.units {
					allUnits[u] = true
				}
				if via == "direct" {
					c.direct = r
				} else {
					c.shim = r
				}
			}
			cells[[2]string{a, e}] = c
			passed, failed, directPassed := 0, 0, 0
			for u, res := range c.shim.units {
				switch res {
				case "pass":
					passed++
				case "fail":
					failed++
					if _, ok := knownReason(known, u); !ok {
						problems = append(problems, fmt.Sprintf("apiserver %s, etcd %s: %s fails through the shim", a, e, u))
					}
				}
			}
			for u, res := range c.direct.units {
				switch res {
				case "pass":
					directPassed++
				case "fail":
					problems = append(problems, fmt.Sprintf("apiserver %s, etcd %s: %s fails straight against etcd (the control)", a, e, u))
				}
			}
			fmt.Printf("kubernetes storage conformance (apiserver %s, etcd %s): %d passed, %d failed through the shim (direct: %d passed)\n",
				apiservers.full[a], etcds.full[e], passed, failed, directPassed)
		}
	}
	for _, e := range etcds.names {
		path := filepath.Join(dir, fmt.Sprintf("wardle-%s.json", e))
		if _, err := os.Stat(path); err != nil {
			continue
		}
		outcome, err := testOutcome(path, "TestWardle")
		if err != nil {
			return err
		}
		fmt.Printf("wardle (k8s.io/sample-apiserver) through the shim on etcd %s: %s\n", etcds.full[e], outcome)
		if outcome != "pass" {
			problems = append(problems, fmt.Sprintf("the wardle test did not pass on etcd %s (see %s)", e, strings.TrimSuffix(path, ".json")+".log"))
		}
	}

	if docs != "" {
		units := make([]string, 0, len(allUnits))
		for u := range allUnits {
			units = append(units, u)
		}
		sort.Strings(units)
		var b strings.Builder
		b.WriteString("| test |")
		for _, a := range apiservers.names {
			for _, e := range etcds.names {
				fmt.Fprintf(&b, " %s, etcd %s |", apiservers.full[a], strings.TrimPrefix(etcds.full[e], "v"))
			}
		}
		b.WriteString("\n|---|")
		for range len(apiservers.names) * len(etcds.names) {
			b.WriteString("---|")
		}
		b.WriteString("\n")
		for _, u := range units {
			fmt.Fprintf(&b, "| `%s` |", u)
			for _, a := range apiservers.names {
				for _, e := range etcds.names {
					c := cells[[2]string{a, e}]
					fmt.Fprintf(&b, " %s / %s |", mark(c.direct.units[u]), mark(c.shim.units[u]))
				}
			}
			b.WriteString("\n")
		}
		if err := replaceTable(docs, b.String()); err != nil {
			return err
		}
	}

	if len(problems) > 0 {
		for _, p := range problems {
			fmt.Fprintln(os.Stderr, "kubernetes:", p)
		}
		return fmt.Errorf("%d problem(s)", len(problems))
	}
	return nil
}

// mark is a cell's symbol: passed, failed, skipped, or not in that version.
func mark(result string) string {
	switch result {
	case "pass":
		return "pass"
	case "fail":
		return "**FAIL**"
	case "skip":
		return "skip"
	default:
		return "–"
	}
}

func testOutcome(path, name string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	outcome := "did not run"
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		var e event
		if json.Unmarshal(sc.Bytes(), &e) == nil && e.Test == name && (e.Action == "pass" || e.Action == "fail" || e.Action == "skip") {
			outcome = e.Action
		}
	}
	return outcome, sc.Err()
}

const (
	tableStart = "<!-- results: written by scripts/kubernetes --write-docs -->"
	tableEnd   = "<!-- end of results -->"
)

// replaceTable puts table between the results markers of a Markdown file.
func replaceTable(path, table string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	s := string(b)
	i, j := strings.Index(s, tableStart), strings.Index(s, tableEnd)
	if i < 0 || j < i {
		return fmt.Errorf("%s has no results markers", path)
	}
	s = s[:i+len(tableStart)] + "\n\n" + table + "\n" + s[j:]
	return os.WriteFile(path, []byte(s), 0o644)
}
