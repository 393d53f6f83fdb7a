// testapp: the one static binary in the test images of tests/realkube.
//
//	testapp pause                 sleep until SIGTERM (the pod sandbox image)
//	testapp serve NAME [ADDR]     HTTP server answering "NAME" (ADDR defaults to :8080)
//	testapp get URL [TRIES]       GET URL, print the body, exit 0 on a 200 (retries 1 s apart)
//
// Busybox's wget crashes on these machines; this replaces it, and pause, with no dependency.
package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: testapp pause | serve NAME [ADDR] | get URL [TRIES]")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "pause":
		stop := make(chan os.Signal, 1)
		signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
		<-stop
	case "serve":
		name, addr := os.Args[2], ":8080"
		if len(os.Args) > 3 {
			addr = os.Args[3]
		}
		http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("x-served-by", name)
			fmt.Fprintln(w, name)
		})
		srv := &http.Server{Addr: addr, ReadHeaderTimeout: 5 * time.Second}
		go func() {
			stop := make(chan os.Signal, 1)
			signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
			<-stop
			srv.Close()
		}()
		if err := srv.ListenAndServe(); err != nil && err != http.ErrServerClosed {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	case "get":
		tries := 1
		if len(os.Args) > 3 {
			tries, _ = strconv.Atoi(os.Args[3])
		}
		client := &http.Client{Timeout: 3 * time.Second}
		var last error
		for i := 0; i < tries; i++ {
			if i > 0 {
				time.Sleep(time.Second)
			}
			resp, err := client.Get(os.Args[2])
			if err != nil {
				last = err
				continue
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == 200 {
				os.Stdout.Write(body)
				return
			}
			last = fmt.Errorf("HTTP %d", resp.StatusCode)
		}
		fmt.Fprintln(os.Stderr, last)
		os.Exit(1)
	default:
		fmt.Fprintln(os.Stderr, "unknown command", os.Args[1])
		os.Exit(2)
	}
}
