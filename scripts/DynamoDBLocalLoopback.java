// Runs AWS's DynamoDB Local on 127.0.0.1 only (used by scripts/emulator; never in production).
//
// DynamoDB Local's own entry point has no option for the listen address and binds every
// interface. This launcher builds the server from the same command-line options, sets the
// address of its (not yet started) Jetty connector to loopback, and starts it. It runs as a
// single source file: java -cp DynamoDBLocal.jar DynamoDBLocalLoopback.java -inMemory -port P
import java.lang.reflect.Field;
import org.eclipse.jetty.server.Connector;
import org.eclipse.jetty.server.Server;
import org.eclipse.jetty.server.ServerConnector;
import software.amazon.dynamodb.services.local.main.ServerRunner;
import software.amazon.dynamodb.services.local.server.DynamoDBProxyServer;

public class DynamoDBLocalLoopback {
  public static void main(String[] args) throws Exception {
    DynamoDBProxyServer proxy = ServerRunner.createServerFromCommandLineArgs(args);
    Field field = DynamoDBProxyServer.class.getDeclaredField("server");
    field.setAccessible(true);
    Server server = (Server) field.get(proxy);
    for (Connector connector : server.getConnectors()) {
      ((ServerConnector) connector).setHost("127.0.0.1");
    }
    proxy.start();
    System.out.println("DynamoDB Local listening on 127.0.0.1");
    proxy.join();
  }
}
