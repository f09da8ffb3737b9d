// Command pgshop is the Go service of zerotrace's database/sql tests: an HTTP server whose
// handlers reach a real PostgreSQL server through lib/pq along every database/sql path
// (DB, Conn, Tx, prepared Stmt, Tx-bound Stmt) and one statement that fails. It builds
// against the offline module sources in ../shared/gomod (see tools::go_build_with).
//
// Usage: pgshop ADDR DSN. The tables are made before it listens, so a tracer attached
// afterwards sees only the handlers' statements. Every statement is written here once and
// the tests compare the spans against the same texts.
package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strings"

	"github.com/lib/pq"
)

var (
	db       *sql.DB
	byID     *sql.Stmt
	bumpByID *sql.Stmt
)

func idOf(r *http.Request, prefix string) string { return strings.TrimPrefix(r.URL.Path, prefix) }

func fail(w http.ResponseWriter, err error) {
	var pe *pq.Error
	if errors.As(err, &pe) {
		w.Header().Set("X-Sqlstate", string(pe.Code))
	}
	w.WriteHeader(http.StatusInternalServerError)
	fmt.Fprint(w, err)
}

// query: DB.QueryRowContext (database/sql's queryDC).
func query(w http.ResponseWriter, r *http.Request) {
	var name string
	if err := db.QueryRowContext(r.Context(), "SELECT name FROM items WHERE id = $1", idOf(r, "/query/")).Scan(&name); err != nil {
		fail(w, err)
		return
	}
	fmt.Fprint(w, name)
}

// exec: DB.ExecContext (execDC) with a literal in the text, which spans never show.
func exec(w http.ResponseWriter, r *http.Request) {
	if _, err := db.ExecContext(r.Context(), "UPDATE items SET stock = stock - 1 WHERE id = $1 AND name <> 'hunter2'", idOf(r, "/exec/")); err != nil {
		fail(w, err)
		return
	}
	fmt.Fprint(w, "ok")
}

// stmt: statements prepared at start, run by Stmt.QueryRowContext and Stmt.ExecContext.
func stmt(w http.ResponseWriter, r *http.Request) {
	var name string
	if err := byID.QueryRowContext(r.Context(), idOf(r, "/stmt/")).Scan(&name); err != nil {
		fail(w, err)
		return
	}
	if _, err := bumpByID.ExecContext(r.Context(), idOf(r, "/stmt/")); err != nil {
		fail(w, err)
		return
	}
	fmt.Fprint(w, name)
}

// tx: a transaction with an insert and a statement bound to it (Tx.StmtContext), committed.
func tx(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	t, err := db.BeginTx(ctx, nil)
	if err != nil {
		fail(w, err)
		return
	}
	defer t.Rollback()
	if _, err := t.ExecContext(ctx, "INSERT INTO audit (item) VALUES ($1)", idOf(r, "/tx/")); err != nil {
		fail(w, err)
		return
	}
	var name string
	if err := t.StmtContext(ctx, byID).QueryRowContext(ctx, idOf(r, "/tx/")).Scan(&name); err != nil {
		fail(w, err)
		return
	}
	if err := t.Commit(); err != nil {
		fail(w, err)
		return
	}
	fmt.Fprint(w, name)
}

// conn: a dedicated connection (DB.Conn) running a query.
func conn(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	c, err := db.Conn(ctx)
	if err != nil {
		fail(w, err)
		return
	}
	defer c.Close()
	var n int
	if err := c.QueryRowContext(ctx, "SELECT count(*) FROM audit").Scan(&n); err != nil {
		fail(w, err)
		return
	}
	fmt.Fprint(w, n)
}

// broken: a table that does not exist (SQLSTATE 42P01).
func broken(w http.ResponseWriter, r *http.Request) {
	rows, err := db.QueryContext(r.Context(), "SELECT id FROM missing_table")
	if err != nil {
		fail(w, err)
		return
	}
	rows.Close()
	fmt.Fprint(w, "unexpected")
}

func setup(ctx context.Context) error {
	for _, s := range []string{
		"DROP TABLE IF EXISTS items, audit",
		"CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, stock int NOT NULL)",
		"CREATE TABLE audit (item int NOT NULL)",
		"INSERT INTO items SELECT g, 'item-' || g, 1000000 FROM generate_series(1, 1000) AS g",
	} {
		if _, err := db.ExecContext(ctx, s); err != nil {
			return fmt.Errorf("%s: %w", s, err)
		}
	}
	var err error
	if byID, err = db.PrepareContext(ctx, "SELECT name FROM items WHERE id = $1"); err != nil {
		return err
	}
	bumpByID, err = db.PrepareContext(ctx, "UPDATE items SET stock = stock + 1 WHERE id = $1")
	return err
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: pgshop ADDR DSN")
		os.Exit(2)
	}
	var err error
	if db, err = sql.Open("postgres", os.Args[2]); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	db.SetMaxOpenConns(8)
	if err := setup(context.Background()); err != nil {
		fmt.Fprintln(os.Stderr, "setup:", err)
		os.Exit(1)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/query/", query)
	mux.HandleFunc("/exec/", exec)
	mux.HandleFunc("/stmt/", stmt)
	mux.HandleFunc("/tx/", tx)
	mux.HandleFunc("/conn/", conn)
	mux.HandleFunc("/broken/", broken)
	fmt.Println("listening on", os.Args[1])
	if err := http.ListenAndServe(os.Args[1], mux); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
