# Sourced by the bench scripts that put nginx beside or behind the gateway as a fixed-answer
# MCP server.

fixed_nginx() { # listen... -> starts nginx (one worker) answering every request with a fixed
  # JSON-RPC result, with a `listen` line for each argument ("127.0.0.1:PORT", "unix:PATH",
  # "127.0.0.1:PORT ssl" with $ssl_cert and $ssl_key set); sets $nginx_worker. Needs $work; the
  # caller waits for the listeners, and stops nginx on exit ($work/nginx.pid).
  local answer='{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"hello"}],"isError":false}}'
  local listen="" l
  for l in "$@"; do listen+="    listen $l;"$'\n'; done
  [ -n "${ssl_cert:-}" ] && listen+="    ssl_certificate $ssl_cert;
    ssl_certificate_key $ssl_key;"
  cat > "$work/nginx.conf" <<CONF
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  client_body_temp_path $work;
  server {
$listen
    location / { default_type application/json; return 200 '$answer'; }
  }
}
CONF
  nginx -c "$work/nginx.conf" -e "$work/nginx.log"
  until [ -s "$work/nginx.pid" ]; do sleep 0.05; done
  nginx_worker=$(pgrep -P "$(cat "$work/nginx.pid")" | head -n 1)
}
