// The service the Thrift end-to-end tests run through the proxy.
namespace py calc

exception Oops {
  1: string why,
}

service Calc {
  i32 add(1: i32 a, 2: i32 b),
  string whoami(),
  string echo(1: string s),
  void sleep(1: i32 ms),
  oneway void fire(1: string note),
  list<string> fired(),
  string unrouted(),
  void fail(1: string why) throws (1: Oops oops),
}
