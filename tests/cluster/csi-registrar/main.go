// csi-registrar: the kubelet plugin registration service of the test cluster's CSI driver, the
// part a CSI driver normally gets from the node-driver-registrar sidecar (not served by the Go
// module proxy here). It tells the kubelet the driver's name and node-plugin socket.
//
// It is written in Go because the kubelet's registration client (grpc-go, dialled with a bare socket
// path) sends that path as the HTTP/2 :authority, which Rust's h2 rejects as malformed
// (kubernetes/kubernetes#109081); grpc-go servers accept it, as node-driver-registrar does.
// tests/cluster/build-binaries builds it with the Kubernetes modules.
package main

import (
	"context"
	"flag"
	"log"
	"net"
	"os"
	"os/signal"
	"syscall"

	"google.golang.org/grpc"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

type registrar struct {
	registerapi.UnimplementedRegistrationServer
	name     string
	endpoint string
}

func (r *registrar) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              r.name,
		Endpoint:          r.endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (r *registrar) NotifyRegistrationStatus(_ context.Context, s *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if s.PluginRegistered {
		log.Printf("the kubelet registered %s", r.name)
	} else {
		log.Printf("the kubelet refused %s: %s", r.name, s.Error)
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

func main() {
	name := flag.String("name", "", "the CSI driver's name")
	endpoint := flag.String("endpoint", "", "the node plugin's socket, as the kubelet sees it")
	socket := flag.String("socket", "", "the registration socket to serve (in <kubelet-dir>/plugins_registry)")
	flag.Parse()
	if *name == "" || *endpoint == "" || *socket == "" {
		log.Fatal("--name, --endpoint and --socket are required")
	}
	if err := os.Remove(*socket); err != nil && !os.IsNotExist(err) {
		log.Fatalf("removing the old socket: %v", err)
	}
	l, err := net.Listen("unix", *socket)
	if err != nil {
		log.Fatalf("listening on %s: %v", *socket, err)
	}
	s := grpc.NewServer()
	registerapi.RegisterRegistrationServer(s, &registrar{name: *name, endpoint: *endpoint})
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-stop
		s.Stop()
		os.Remove(*socket)
	}()
	log.Printf("serving the registration of %s on %s", *name, *socket)
	if err := s.Serve(l); err != nil {
		log.Fatalf("serving: %v", err)
	}
}
