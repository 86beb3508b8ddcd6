# Sourced by bench/run.sh and bench/instructions.sh: the nginx both start.
#
# nginx_conf WORKERS CONNECTIONS [MORE]: writes $WORK/nginx/nginx.conf with the fast
# upstream on 127.0.0.1:$P_UP (a fixed 201 with a small JSON body, like a created
# charge) and MORE (further server and upstream blocks) inside its http block.

# The fast upstream's answer, as an nginx `return` directive.
NGINX_CHARGE="default_type application/json;
            return 201 '{\"id\":\"ch_3PbXbench\",\"object\":\"charge\",\"amount\":1500,\"currency\":\"brl\",\"status\":\"succeeded\"}';"

nginx_conf() {
    mkdir -p "$WORK/nginx"
    cat >"$WORK/nginx/nginx.conf" <<NG
worker_processes $1;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections $2; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
    server {
        listen 127.0.0.1:$P_UP;
        location / {
            $NGINX_CHARGE
        }
    }
    ${3:-}
}
NG
}
