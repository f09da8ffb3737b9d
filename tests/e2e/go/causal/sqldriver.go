// A tiny in-memory database/sql driver, so that the test service needs only the standard
// library: every query returns one row, statements mentioning "broken" fail.
package main

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"io"
	"strings"
)

type memDriver struct{}
type memConn struct{}
type memRows struct{ done bool }

func (memDriver) Open(string) (driver.Conn, error) { return memConn{}, nil }

func (memConn) Prepare(string) (driver.Stmt, error) { return nil, errors.New("prepare not supported") }
func (memConn) Close() error                         { return nil }
func (memConn) Begin() (driver.Tx, error)            { return nil, errors.New("no transactions") }

func (memConn) QueryContext(_ context.Context, q string, _ []driver.NamedValue) (driver.Rows, error) {
	if strings.Contains(q, "broken") {
		return nil, errors.New("no such table: nowhere")
	}
	return &memRows{}, nil
}

func (memConn) ExecContext(_ context.Context, q string, _ []driver.NamedValue) (driver.Result, error) {
	if strings.Contains(q, "broken") {
		return nil, errors.New("no such table: nowhere")
	}
	return driver.RowsAffected(1), nil
}

func (r *memRows) Columns() []string { return []string{"name"} }
func (r *memRows) Close() error      { return nil }
func (r *memRows) Next(dest []driver.Value) error {
	if r.done {
		return io.EOF
	}
	r.done = true
	dest[0] = "widget"
	return nil
}

var db *sql.DB

func init() {
	sql.Register("mem", memDriver{})
	db, _ = sql.Open("mem", "")
}
